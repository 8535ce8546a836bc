//! Unicode helpers shared by the tokenizers: codepoint classes as llama.cpp's
//! pre-tokenizers see them, and the GPT-2 byte <-> unicode mapping.

use unicode_general_category::{get_general_category, GeneralCategory as Gc};

/// The classes of one codepoint that the pre-tokenizers look at.
///
/// Exactly one of the category bits is set for a real codepoint (unassigned
/// codepoints get [`Flags::UNDEFINED`]); [`Flags::NONE`] stands for "no codepoint"
/// (a position outside the segment being split).
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Flags(u16);

impl Flags {
    pub(crate) const NONE: Flags = Flags(0);
    pub(crate) const UNDEFINED: Flags = Flags(0x0001);
    const NUMBER: u16 = 0x0002;
    const LETTER: u16 = 0x0004;
    const SEPARATOR: u16 = 0x0008;
    const MARK: u16 = 0x0010;
    const PUNCTUATION: u16 = 0x0020;
    const SYMBOL: u16 = 0x0040;
    const CONTROL: u16 = 0x0080;
    const WHITESPACE: u16 = 0x0100;

    /// Classes of `c`: its general category group, plus the White_Space property.
    pub(crate) fn of(c: char) -> Flags {
        let cat = if assigned_after_upstream(c) {
            Self::UNDEFINED.0
        } else {
            Self::category(c)
        };
        // `char::is_whitespace` is exactly the Unicode White_Space property,
        // the set llama.cpp's `\s` uses.
        let ws = if c.is_whitespace() {
            Self::WHITESPACE
        } else {
            0
        };
        Flags(cat | ws)
    }

    fn category(c: char) -> u16 {
        match get_general_category(c) {
            Gc::UppercaseLetter
            | Gc::LowercaseLetter
            | Gc::TitlecaseLetter
            | Gc::ModifierLetter
            | Gc::OtherLetter => Self::LETTER,
            Gc::NonspacingMark | Gc::SpacingMark | Gc::EnclosingMark => Self::MARK,
            Gc::DecimalNumber | Gc::LetterNumber | Gc::OtherNumber => Self::NUMBER,
            Gc::ConnectorPunctuation
            | Gc::DashPunctuation
            | Gc::OpenPunctuation
            | Gc::ClosePunctuation
            | Gc::InitialPunctuation
            | Gc::FinalPunctuation
            | Gc::OtherPunctuation => Self::PUNCTUATION,
            Gc::MathSymbol | Gc::CurrencySymbol | Gc::ModifierSymbol | Gc::OtherSymbol => {
                Self::SYMBOL
            }
            Gc::SpaceSeparator | Gc::LineSeparator | Gc::ParagraphSeparator => Self::SEPARATOR,
            Gc::Control | Gc::Format | Gc::Surrogate | Gc::PrivateUse => Self::CONTROL,
            // Unassigned, and any category a later crate version adds.
            _ => Self::UNDEFINED.0,
        }
    }

    pub(crate) fn is_none(self) -> bool {
        self.0 == 0
    }
    pub(crate) fn is_number(self) -> bool {
        self.0 & Self::NUMBER != 0
    }
    pub(crate) fn is_letter(self) -> bool {
        self.0 & Self::LETTER != 0
    }
    pub(crate) fn is_mark(self) -> bool {
        self.0 & Self::MARK != 0
    }
    pub(crate) fn is_whitespace(self) -> bool {
        self.0 & Self::WHITESPACE != 0
    }
    /// Punctuation category only (whitespace excluded), as llama.cpp's collapsed `\p{P}`.
    pub(crate) fn is_punctuation_only(self) -> bool {
        self.0 & Self::PUNCTUATION != 0 && !self.is_whitespace()
    }
}

/// Codepoints first assigned in Unicode 16.0 (DerivedAge.txt, `Age=16.0`), inclusive
/// ranges. `unicode-general-category` has Unicode 16.0 data; llama.cpp's tables are
/// 15.1, where these are unassigned, so they are classed as unassigned here too.
#[rustfmt::skip]
const ASSIGNED_IN_16_0: &[(u32, u32)] = &[
    (0x0897, 0x0897), (0x1B4E, 0x1B4F), (0x1B7F, 0x1B7F), (0x1C89, 0x1C8A), (0x2427, 0x2429),
    (0x31E4, 0x31E5), (0xA7CB, 0xA7CD), (0xA7DA, 0xA7DC), (0x105C0, 0x105F3),
    (0x10D40, 0x10D65), (0x10D69, 0x10D85), (0x10D8E, 0x10D8F), (0x10EC2, 0x10EC4),
    (0x10EFC, 0x10EFC), (0x11380, 0x11389), (0x1138B, 0x1138B), (0x1138E, 0x1138E),
    (0x11390, 0x113B5), (0x113B7, 0x113C0), (0x113C2, 0x113C2), (0x113C5, 0x113C5),
    (0x113C7, 0x113CA), (0x113CC, 0x113D5), (0x113D7, 0x113D8), (0x113E1, 0x113E2),
    (0x116D0, 0x116E3), (0x11BC0, 0x11BE1), (0x11BF0, 0x11BF9), (0x11F5A, 0x11F5A),
    (0x13460, 0x143FA), (0x16100, 0x16139), (0x16D40, 0x16D79), (0x18CFF, 0x18CFF),
    (0x1CC00, 0x1CCF9), (0x1CD00, 0x1CEB3), (0x1E5D0, 0x1E5FA), (0x1E5FF, 0x1E5FF),
    (0x1F8B2, 0x1F8BB), (0x1F8C0, 0x1F8C1), (0x1FA89, 0x1FA89), (0x1FA8F, 0x1FA8F),
    (0x1FABE, 0x1FABE), (0x1FAC6, 0x1FAC6), (0x1FADC, 0x1FADC), (0x1FADF, 0x1FADF),
    (0x1FAE9, 0x1FAE9), (0x1FBCB, 0x1FBEF),
];

/// Whether `c` is assigned in our Unicode tables but not in upstream's.
fn assigned_after_upstream(c: char) -> bool {
    let cp = u32::from(c);
    if cp < 0x0897 {
        return false;
    }
    let i = ASSIGNED_IN_16_0.partition_point(|&(_, last)| last < cp);
    ASSIGNED_IN_16_0
        .get(i)
        .is_some_and(|&(first, _)| first <= cp)
}

/// The printable bytes GPT-2 maps to themselves: `!`..=`~`, `¡`..=`¬`, `®`..=`ÿ`.
const fn byte_is_printable(b: u8) -> bool {
    matches!(b, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF)
}

/// GPT-2's byte -> codepoint table: printable bytes map to themselves, the other
/// 68 bytes to U+0100.. in byte order.
const BYTE_TO_CP: [u16; 256] = {
    let mut t = [0u16; 256];
    let mut n = 0u16;
    let mut b = 0usize;
    while b < 256 {
        t[b] = if byte_is_printable(b as u8) {
            b as u16
        } else {
            n += 1;
            255 + n
        };
        b += 1;
    }
    t
};

/// The character GPT-2's byte-level BPE uses for byte `b`.
pub(crate) fn byte_to_char(b: u8) -> char {
    // Every table entry is below U+0144, a valid scalar value.
    char::from_u32(u32::from(BYTE_TO_CP[usize::from(b)])).unwrap_or('\u{FFFD}')
}

/// The byte that GPT-2's byte-level BPE writes as `c`, if `c` is one of the 256.
pub(crate) fn char_to_byte(c: char) -> Option<u8> {
    let cp = u32::from(c);
    if cp < 256 {
        let b = cp as u8;
        return byte_is_printable(b).then_some(b);
    }
    NON_PRINTABLE.get((cp - 256) as usize).copied()
}

/// The 68 non-printable bytes in order: byte `NON_PRINTABLE[k]` is written as U+0100 + k.
const NON_PRINTABLE: [u8; 68] = {
    let mut t = [0u8; 68];
    let mut n = 0usize;
    let mut b = 0usize;
    while b < 256 {
        if !byte_is_printable(b as u8) {
            t[n] = b as u8;
            n += 1;
        }
        b += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_256_chars() {
        let mut seen = std::collections::HashSet::new();
        for b in 0..=255u8 {
            let c = byte_to_char(b);
            assert!(seen.insert(c), "duplicate char for byte {b}");
            assert_eq!(char_to_byte(c), Some(b));
        }
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
        assert_eq!(char_to_byte('A'), Some(b'A'));
        assert_eq!(char_to_byte('€'), None);
        assert_eq!(char_to_byte(' '), None);
    }

    #[test]
    fn category_tables_are_the_expected_unicode_version() {
        // ASSIGNED_IN_16_0 bridges Unicode 16.0 (the crate) and 15.1 (upstream). A crate
        // update to a newer Unicode needs that table extended (or upstream moved on).
        assert_eq!(
            unicode_general_category::UNICODE_VERSION,
            (16, 0, 0),
            "unicode-general-category changed Unicode version; the llama.cpp we match \
             has Unicode 15.1 tables (unicode-data.cpp)"
        );
        let n: u32 = ASSIGNED_IN_16_0.iter().map(|&(a, b)| b - a + 1).sum();
        assert_eq!(n, 5185, "Unicode 16.0 added 5185 characters");
        assert!(ASSIGNED_IN_16_0.windows(2).all(|w| w[0].1 < w[1].0));
        assert!(Flags::of('\u{11380}') == Flags::UNDEFINED);
        assert!(Flags::of('\u{1C89}') == Flags::UNDEFINED);
        assert!(Flags::of('\u{1C88}').is_letter());
        assert!(Flags::of('\u{13460}') == Flags::UNDEFINED);
        assert!(Flags::of('\u{1FBF0}').is_number());
    }

    #[test]
    fn flags_follow_general_category() {
        assert!(Flags::of('a').is_letter());
        assert!(Flags::of('漢').is_letter());
        assert!(Flags::of('7').is_number());
        assert!(Flags::of('²').is_number());
        assert!(Flags::of('\u{0301}').is_mark());
        assert!(Flags::of('\u{3000}').is_whitespace());
        assert!(Flags::of('\u{85}').is_whitespace());
        assert!(!Flags::of('\u{1C}').is_whitespace());
        assert!(Flags::of('!').is_punctuation_only());
        assert!(!Flags::of('$').is_punctuation_only());
        assert!(Flags::of('\u{0378}') == Flags::UNDEFINED);
        assert!(!Flags::of('\u{200D}').is_none());
    }
}
