//! Building a [`Tokenizer`] from a model's metadata: the vocabulary spec,
//! pre-tokenizer configurations, special-token roles and the checks on
//! all of it.

use super::*;
use crate::tokenizer::TokenizerErrorKind;

/// How llama.cpp configures a byte-level BPE vocabulary for one pre-tokenizer name.
pub(super) struct PreConfig {
    pub(super) stages: &'static [Split],
    pub(super) ignore_merges: bool,
    pub(super) add_bos: bool,
    pub(super) clean_spaces: bool,
    /// The BOS default is "none" (chatglm / glm).
    pub(super) no_default_bos: bool,
}

pub(super) fn pre_config(pre: &str) -> Option<PreConfig> {
    use Split::*;
    const DEFAULT: &[Split] = &[
        PunctRuns { backtick: false },
        Gpt2,
        NumberRuns,
        AsciiDigitTriples,
    ];
    const FALCON: &[Split] = &[PunctRuns { backtick: true }, Gpt2, AsciiDigitTriples];
    const DIGITS_GPT2: &[Split] = &[EachNumber, Gpt2];
    const GPT2: &[Split] = &[Gpt2];
    const LLAMA3: &[Split] = &[Llama3];
    const QWEN2: &[Split] = &[Qwen2];
    const QWEN35: &[Split] = &[Qwen35];

    let cfg = |stages, clean_spaces| PreConfig {
        stages,
        ignore_merges: false,
        add_bos: false,
        clean_spaces,
        no_default_bos: false,
    };
    Some(match pre {
        "" | "default" => cfg(DEFAULT, true),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => PreConfig {
            ignore_merges: true,
            add_bos: true,
            ..cfg(LLAMA3, true)
        },
        "dbrx" | "smaug-bpe" => cfg(LLAMA3, true),
        "chatglm-bpe" => PreConfig {
            no_default_bos: true,
            ..cfg(LLAMA3, true)
        },
        "glm4" | "glm5" => PreConfig {
            no_default_bos: true,
            ignore_merges: true,
            ..cfg(LLAMA3, true)
        },
        "falcon" => cfg(FALCON, true),
        "starcoder" | "refact" | "codeshell" | "exaone" | "minerva-7b" | "mellum2" => {
            cfg(DIGITS_GPT2, true)
        }
        "command-r" | "smollm" => cfg(DIGITS_GPT2, false),
        "mpt" | "olmo" | "jais" | "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat"
        | "jina-v2-es" | "jina-v2-de" | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en"
        | "jina-v2-code" | "roberta-bpe" | "exaone4" => cfg(GPT2, true),
        "trillion" | "granite-docling" => cfg(GPT2, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "hunyuan" | "solar-open" => {
            cfg(QWEN2, false)
        }
        "megrez" | "stablelm2" => cfg(QWEN2, true),
        "qwen35" => cfg(QWEN35, false),
        _ => return None,
    })
}

/// Special token roles, indexing [`Tokenizer::special`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Bos,
    Eos,
    Eot,
    Eom,
    Unk,
    Sep,
    Pad,
    Mask,
    FimPre,
    FimSuf,
    FimMid,
    FimPad,
    FimRep,
    FimSep,
}
pub(super) const N_ROLES: usize = 14;

/// Metadata keys naming special token ids, in the order llama.cpp applies them
/// (the deprecated prefix/suffix/middle keys last, so they win).
pub(super) const ROLE_KEYS: &[(&str, Role)] = &[
    ("tokenizer.ggml.bos_token_id", Role::Bos),
    ("tokenizer.ggml.eos_token_id", Role::Eos),
    ("tokenizer.ggml.eot_token_id", Role::Eot),
    ("tokenizer.ggml.eom_token_id", Role::Eom),
    ("tokenizer.ggml.unknown_token_id", Role::Unk),
    ("tokenizer.ggml.seperator_token_id", Role::Sep),
    ("tokenizer.ggml.padding_token_id", Role::Pad),
    ("tokenizer.ggml.mask_token_id", Role::Mask),
    ("tokenizer.ggml.fim_pre_token_id", Role::FimPre),
    ("tokenizer.ggml.fim_suf_token_id", Role::FimSuf),
    ("tokenizer.ggml.fim_mid_token_id", Role::FimMid),
    ("tokenizer.ggml.fim_pad_token_id", Role::FimPad),
    ("tokenizer.ggml.fim_rep_token_id", Role::FimRep),
    ("tokenizer.ggml.fim_sep_token_id", Role::FimSep),
    ("tokenizer.ggml.prefix_token_id", Role::FimPre),
    ("tokenizer.ggml.suffix_token_id", Role::FimSuf),
    ("tokenizer.ggml.middle_token_id", Role::FimMid),
];

/// Token texts llama.cpp recognises as a role when the metadata does not name one.
pub(super) const ROLE_TEXTS: &[(Role, &[&str])] = &[
    (
        Role::Eot,
        &[
            "<|eot_id|>",
            "<|im_end|>",
            "<|end|>",
            "<end_of_turn>",
            "<|endoftext|>",
            "<|end_of_text|>",
            "<EOT>",
            "_<EOT>",
            "[EOT]",
            "<｜end▁of▁sentence｜>",
            "<end_of_utterance>",
        ],
    ),
    (Role::Eom, &["<|eom_id|>"]),
    (
        Role::FimPre,
        &[
            "<|fim_prefix|>",
            "<fim-prefix>",
            "<fim_prefix>",
            "<｜fim▁begin｜>",
            "<PRE>",
            "▁<PRE>",
            "<|code_prefix|>",
            "<|prefix|>",
        ],
    ),
    (
        Role::FimSuf,
        &[
            "<|fim_suffix|>",
            "<fim-suffix>",
            "<fim_suffix>",
            "<｜fim▁hole｜>",
            "<SUF>",
            "▁<SUF>",
            "<|code_suffix|>",
            "<|suffix|>",
        ],
    ),
    (
        Role::FimMid,
        &[
            "<|fim_middle|>",
            "<fim-middle>",
            "<fim_middle>",
            "<｜fim▁end｜>",
            "<MID>",
            "▁<MID>",
            "<|code_middle|>",
            "<|middle|>",
        ],
    ),
    (
        Role::FimPad,
        &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"],
    ),
    (
        Role::FimRep,
        &[
            "<|fim_repo|>",
            "<|repo_name|>",
            "<fim-repo>",
            "<REPO>",
            "<reponame>",
        ],
    ),
    (Role::FimSep, &["<|file_sep|>"]),
];

/// Token texts that end generation (llama.cpp's EOG list).
pub(super) const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// The tokenizer-related metadata of a model, as read from its GGUF file.
#[derive(Default)]
pub(crate) struct VocabSpec<'a> {
    /// `tokenizer.ggml.model`.
    pub(crate) model: &'a str,
    /// `tokenizer.ggml.pre`.
    pub(crate) pre: Option<&'a str>,
    pub(crate) tokens: &'a [String],
    pub(crate) token_types: Option<&'a [i32]>,
    pub(crate) scores: Option<Vec<f32>>,
    pub(crate) merges: Option<&'a [String]>,
    /// Special token ids named by the metadata, by key.
    pub(crate) ids: Vec<(&'static str, u32)>,
    pub(crate) add_bos: Option<bool>,
    pub(crate) add_eos: Option<bool>,
    pub(crate) add_space_prefix: Option<bool>,
    /// `general.name`.
    pub(crate) name: Option<&'a str>,
    /// `general.architecture`.
    pub(crate) architecture: Option<&'a str>,
}

impl<'a> VocabSpec<'a> {
    /// Read the tokenizer metadata of `g`.
    pub(crate) fn from_gguf(g: &'a Gguf) -> Result<VocabSpec<'a>> {
        let tokens = g.value::<&[String]>("tokenizer.ggml.tokens")?;
        let token_types = match g.get("tokenizer.ggml.token_type") {
            None => None,
            Some(Value::Array(Array::I32(v))) => Some(v.as_slice()),
            Some(other) => {
                return Err(Error::tokenizer(
                    TokenizerErrorKind::Vocabulary,
                    format!(
                        "tokenizer.ggml.token_type: expected array of i32, found {}",
                        other.type_name()
                    ),
                ))
            }
        };
        let scores = match g.get("tokenizer.ggml.scores") {
            None => None,
            Some(Value::Array(Array::F32(v))) => Some(v.clone()),
            Some(Value::Array(Array::I32(v))) => Some(v.iter().map(|&s| s as f32).collect()),
            Some(other) => {
                return Err(Error::tokenizer(
                    TokenizerErrorKind::Vocabulary,
                    format!(
                        "tokenizer.ggml.scores: expected array of f32 or array of i32, found {}",
                        other.type_name()
                    ),
                ))
            }
        };
        let merges = match g.get("tokenizer.ggml.merges") {
            None => None,
            Some(Value::Array(Array::String(v))) => Some(v.as_slice()),
            Some(other) => {
                return Err(Error::tokenizer(
                    TokenizerErrorKind::Merges,
                    format!(
                        "tokenizer.ggml.merges: expected array of string, found {}",
                        other.type_name()
                    ),
                ))
            }
        };
        let mut ids = Vec::new();
        for &(key, _) in ROLE_KEYS {
            if let Some(id) = g.opt_value::<u32>(key)? {
                ids.push((key, id));
            }
        }
        Ok(VocabSpec {
            model: g.value::<&str>("tokenizer.ggml.model")?,
            pre: g.opt_value::<&str>("tokenizer.ggml.pre")?,
            tokens,
            token_types,
            scores,
            merges,
            ids,
            add_bos: g.opt_value::<bool>("tokenizer.ggml.add_bos_token")?,
            add_eos: g.opt_value::<bool>("tokenizer.ggml.add_eos_token")?,
            add_space_prefix: g.opt_value::<bool>("tokenizer.ggml.add_space_prefix")?,
            name: g.opt_value::<&str>("general.name")?,
            architecture: g.opt_value::<&str>("general.architecture")?,
        })
    }
}

impl Tokenizer {
    /// Build the tokenizer of the model in `g` (its `tokenizer.ggml.*` metadata).
    ///
    /// Fails with [`Error::Unsupported`] for a vocabulary kind other than `gpt2` or
    /// `llama`, or a pre-tokenizer not in [`SUPPORTED_PRE`]; with
    /// [`Error::Tokenizer`] for an inconsistent vocabulary (duplicate tokens,
    /// merges of unknown tokens, arrays shorter than the vocabulary, ...).
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer> {
        Self::from_spec(VocabSpec::from_gguf(g)?)
    }

    /// Build from already-extracted metadata (also used by tests with synthetic vocabularies).
    pub(crate) fn from_spec(spec: VocabSpec<'_>) -> Result<Tokenizer> {
        let n = spec.tokens.len();
        if n == 0 {
            return Err(Error::tokenizer(
                TokenizerErrorKind::Vocabulary,
                "tokenizer.ggml.tokens: expected at least one token, found an empty array",
            ));
        }
        if u32::try_from(n).map_or(true, |n| n > i32::MAX as u32) {
            return Err(Error::tokenizer(
                TokenizerErrorKind::Vocabulary,
                format!("tokenizer.ggml.tokens: {n} tokens, more than ids can address"),
            ));
        }
        for (what, len) in [
            ("token_type", spec.token_types.map(<[i32]>::len)),
            ("scores", spec.scores.as_ref().map(Vec::len)),
        ] {
            if let Some(len) = len.filter(|&len| len < n) {
                return Err(Error::tokenizer(
                    TokenizerErrorKind::Vocabulary,
                    format!(
                        "tokenizer.ggml.{what}: expected {n} entries (one per token), found {len}"
                    ),
                ));
            }
        }

        let pre_name = spec.pre.unwrap_or("");
        let is_spm = match spec.model {
            "llama" => true,
            "gpt2" => false,
            other => {
                return Err(Error::Unsupported(format!(
                    "tokenizer model {other:?} (supported: \"gpt2\" byte-level BPE, \
                     \"llama\" SentencePiece)"
                )))
            }
        };
        let pre = if is_spm {
            None
        } else {
            Some(pre_config(pre_name).ok_or_else(|| {
                Error::Unsupported(format!(
                    "pre-tokenizer {pre_name:?} (tokenizer.ggml.pre); supported: {}",
                    SUPPORTED_PRE.join(", ")
                ))
            })?)
        };

        // Texts and the reverse map. llama.cpp reads each text as a C string (so it
        // ends at the first NUL), names empty tokens, and refuses duplicates.
        let mut tokens = Vec::with_capacity(n);
        let mut token_to_id = HashMap::with_capacity(n);
        for (i, text) in spec.tokens.iter().enumerate() {
            let text = c_str(text);
            let text = if text.is_empty() {
                format!("[EMPTY_{i}]")
            } else {
                text.to_string()
            };
            let id = i as u32;
            if let Some(prev) = token_to_id.insert(text.clone(), id) {
                return Err(Error::tokenizer(
                    TokenizerErrorKind::Vocabulary,
                    format!("tokenizer.ggml.tokens: token {i} {text:?} duplicates token {prev}"),
                ));
            }
            tokens.push(text);
        }
        let mut attrs: Vec<u32> = match spec.token_types {
            None => vec![ATTR_NORMAL; n],
            Some(types) => types[..n]
                .iter()
                .map(|t| match t {
                    1 => ATTR_NORMAL,
                    2 => ATTR_UNKNOWN,
                    3 => ATTR_CONTROL,
                    4 => ATTR_USER_DEFINED,
                    5 => ATTR_UNUSED,
                    6 => ATTR_BYTE,
                    _ => 0,
                })
                .collect(),
        };

        // Flags: defaults per kind, then the pre-tokenizer's, then the metadata's.
        let mut add_bos = is_spm || pre.as_ref().is_some_and(|p| p.add_bos);
        let mut add_eos = false;
        let add_space_prefix = spec.add_space_prefix.unwrap_or(is_spm);
        let clean_spaces = pre.as_ref().is_some_and(|p| p.clean_spaces);

        let mut special = [None; N_ROLES];
        if is_spm {
            special[Role::Bos as usize] = Some(1);
            special[Role::Eos as usize] = Some(2);
            special[Role::Unk as usize] = Some(0);
        } else {
            if !pre.as_ref().is_some_and(|p| p.no_default_bos) {
                special[Role::Bos as usize] = Some(11);
            }
            special[Role::Eos as usize] = Some(11);
        }
        for id in special.iter_mut() {
            if id.is_some_and(|id| id as usize >= n) {
                *id = None;
            }
        }
        for &(key, id) in &spec.ids {
            let Some(&(_, role)) = ROLE_KEYS.iter().find(|(k, _)| *k == key) else {
                continue;
            };
            // An out-of-range id keeps the default, as in llama.cpp.
            if (id as usize) < n {
                special[role as usize] = Some(id);
            }
        }
        if let Some(v) = spec.add_bos {
            add_bos = v;
        }
        if let Some(v) = spec.add_eos {
            add_eos = v;
        }

        // Roles found by token text when the metadata does not name them; such
        // tokens become control tokens.
        for (id, text) in tokens.iter().enumerate() {
            for &(role, texts) in ROLE_TEXTS {
                if special[role as usize].is_none() && texts.contains(&text.as_str()) {
                    special[role as usize] = Some(id as u32);
                    attrs[id] |= ATTR_CONTROL;
                }
            }
        }
        for (id, text) in tokens.iter().enumerate() {
            if attrs[id] & ATTR_CONTROL != 0 && text.contains("unused") {
                attrs[id] |= ATTR_UNUSED;
            }
        }

        // End-of-generation set.
        let mut eog = BTreeSet::new();
        for role in [Role::FimPad, Role::FimRep, Role::FimSep] {
            eog.extend(special[role as usize]);
        }
        for (id, text) in tokens.iter().enumerate() {
            if EOG_TEXTS.contains(&text.as_str()) {
                eog.insert(id as u32);
                attrs[id] |= ATTR_CONTROL;
            }
        }
        for (id, text) in tokens.iter().enumerate() {
            if matches!(
                text.as_str(),
                "<|channel|>" | "<|message|>" | "<|start|>" | "<|constrain|>"
            ) {
                attrs[id] = ATTR_USER_DEFINED;
            }
        }
        for role in [Role::Eos, Role::Eot, Role::Eom] {
            eog.extend(special[role as usize]);
        }
        let eog_with = |eog: &BTreeSet<u32>, texts: &[&str]| {
            eog.iter()
                .copied()
                .find(|&id| texts.contains(&tokens[id as usize].as_str()))
        };
        // o200k_harmony / solar-open: "<|end|>" is not an end of generation there.
        if let Some(end) = eog_with(&eog, &["<|end|>"]) {
            let has_return = eog_with(&eog, &["<|return|>"]).is_some();
            let has_call = eog_with(&eog, &["<|call|>", "<|calls|>"]).is_some();
            let has_flush = eog_with(&eog, &["<|flush|>"]).is_some();
            if has_call && (has_return || has_flush) {
                eog.remove(&end);
                attrs[end as usize] = ATTR_USER_DEFINED;
            }
        }
        // gemma4 / plamo: "</s>" is a normal token there.
        if let Some(s) = eog_with(&eog, &["</s>"]) {
            if eog_with(&eog, &["<|tool_response>", "<|plamo:eos|>"]).is_some() {
                eog.remove(&s);
                attrs[s as usize] = ATTR_NORMAL;
            }
        }

        let mut special_tokens: Vec<u32> = (0..n as u32)
            .filter(|&id| {
                attrs[id as usize] & (ATTR_CONTROL | ATTR_USER_DEFINED | ATTR_UNKNOWN) != 0
            })
            .collect();
        special_tokens.sort_by_key(|&id| std::cmp::Reverse(tokens[id as usize].len()));

        // Per-model strip attributes (llama.cpp sets these by model name).
        let name = spec.name.unwrap_or("").to_ascii_lowercase();
        let arch = spec.architecture.unwrap_or("");
        let mut set_attr = |text: &str, attr: u32, on: bool| {
            if let Some(&id) = token_to_id.get(text) {
                let a = &mut attrs[id as usize];
                *a = if on { *a | attr } else { *a & !attr };
            }
        };
        if ["jina-v2-de", "jina-v2-es", "jina-v2-code"]
            .iter()
            .any(|s| pre_name.contains(s))
            || ["nomic-bert-moe", "jina-bert-v3"]
                .iter()
                .any(|s| arch.contains(s))
        {
            set_attr("<mask>", ATTR_LSTRIP, true);
        } else if name.contains("phi-3") || name.contains("phi3") {
            for &id in &special_tokens {
                let text = tokens[id as usize].clone();
                set_attr(&text, ATTR_RSTRIP, true);
            }
            set_attr("</s>", ATTR_RSTRIP, true);
            for text in ["<unk>", "<s>", "<|endoftext|>"] {
                set_attr(text, ATTR_RSTRIP, false);
            }
        } else if name.contains("modern-bert") {
            set_attr("[MASK]", ATTR_LSTRIP, true);
        }

        let kind = match pre {
            None => Kind::Spm(Spm::new(
                &token_to_id,
                spec.scores.unwrap_or_else(|| vec![0.0; n]),
            )),
            Some(pre) => {
                let merges = spec.merges.ok_or_else(|| {
                    Error::tokenizer(
                        TokenizerErrorKind::Merges,
                        "tokenizer.ggml.merges: expected merges for a gpt2 (BPE) vocabulary, \
                         found none",
                    )
                })?;
                Kind::Bpe(Bpe::new(
                    &token_to_id,
                    merges,
                    pre.stages,
                    pre.ignore_merges,
                )?)
            }
        };

        Ok(Tokenizer {
            kind,
            pre: pre_name.to_string(),
            tokens,
            attrs,
            token_to_id,
            special_tokens,
            special,
            eog,
            add_bos,
            add_eos,
            add_space_prefix,
            clean_spaces,
            pieces: std::sync::OnceLock::new(),
        })
    }
}
