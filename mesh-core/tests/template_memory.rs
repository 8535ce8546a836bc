//! Chat templates come from model files: a hostile one must not be able to
//! make the renderer allocate without bound, whatever construct it uses to
//! grow a value (output size alone is not enough: values can double in
//! place, in a namespace, through recursion, in filters and methods).
//!
//! A counting global allocator measures the peak memory of each render;
//! every attack here must fail with a template error and stay under
//! [`PEAK_LIMIT`]. One test in this binary, so nothing else allocates at the
//! same time.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use mesh_core::chat::{ChatMessage, ChatTemplate};
use mesh_core::Error;

/// Bytes above the baseline one render may reach at its peak.
const PEAK_LIMIT: usize = 320 << 20;

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(by: usize) {
    let now = CURRENT.fetch_add(by, Ordering::Relaxed) + by;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counters only observe sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as for `alloc` and `dealloc`.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Render `source` with one message and return the error message and the
/// peak growth of memory during the render.
fn attack(source: &str) -> (Result<String, String>, usize) {
    let template = ChatTemplate::new(source, "<s>", "</s>").expect("the attack compiles");
    let messages = [ChatMessage::new("user", "hello")];
    let base = CURRENT.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let out = template.render(&messages, true);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let out = match out {
        Ok(s) => Ok(format!("{} bytes", s.len())),
        Err(Error::Template(e)) => Err(e.message().to_owned()),
        Err(other) => panic!("{source}: expected a template error, got {other:?}"),
    };
    (out, peak)
}

#[test]
fn hostile_templates_are_stopped_before_they_exhaust_memory() {
    let sequential_doubling = format!(
        "{{% set s = 'xxxxxxxxxxxxxxxx' %}}{}{{{{ s|length }}}}",
        "{% set s = s ~ s %}".repeat(48)
    );
    let attacks = [
        sequential_doubling.as_str(),
        // Doubling a namespace attribute in a loop.
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = '%s%s'|format(ns.s, ns.s) %}{% endfor %}{{ ns.s|length }}",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s * 2 %}{% endfor %}{{ ns.s|length }}",
        // Doubling through macro recursion.
        "{% macro d(s, n) %}{% if n > 0 %}{{ d(s ~ s, n - 1) }}{% else %}{{ s|length }}{% endif %}{% endmacro %}{{ d('x', 60) }}",
        // Repeating a list, and nesting a list in itself, then writing it out
        // (minijinja's core builds `ns.l + ns.l` past 32 levels and
        // `ns.l|string` without fuel: see the module docs of `chat`).
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l * 2 %}{% endfor %}{{ ns.l|length }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|tojson }}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = [ns.l, ns.l] %}{% endfor %}{{ ns.l|tojson(indent=2) }}",
        // Squaring with replace, as a filter and as a Python method.
        "{% set s = 'x' * 100000 %}{{ (s|replace('x', s))|length }}",
        "{% set s = 'x' * 100000 %}{{ s.replace('x', s)|length }}",
        // A long separator times many items.
        "{% set s = 'x' * 1000000 %}{{ range(100000)|join(s)|length }}",
        // Widths and indents as numbers or strings.
        "{{ ('a\\n' * 1000)|indent(100000000) }}",
        "{{ (range(1000)|list)|tojson(indent='x' * 10000000) }}",
        "{{ (range(1000)|list)|tojson(separators=['x' * 10000000, ':']) }}",
        // Many small items from one string.
        "{% set s = ',' * 60000000 %}{{ s.split(',')|length }}",
        "{% set s = ' x' * 30000000 %}{{ s.split()|length }}",
        "{% set s = '\\n' * 60000000 %}{{ s.splitlines()|length }}",
        "{% set s = ',' * 60000000 %}{{ s|split(',')|list|length }}",
        "{% set s = 'x' * 60000000 %}{{ s|list|length }}",
        "{{ ([1] * 100000000)|list|length }}",
        "{{ ([1] * 100000000)|join(',')|length }}",
        "{{ ([1] * 100000000)|tojson|length }}",
        // Big values made and dropped over and over.
        "{% for i in range(100000) %}{% set x = 'x' * 100000000 %}{% endfor %}",
    ];
    let mut failures = Vec::new();
    for source in attacks {
        let (out, peak) = attack(source);
        eprintln!("{:>6} MB peak: {source:.100} -> {out:.120?}", peak >> 20);
        if out.is_ok() || peak > PEAK_LIMIT {
            failures.push(format!("{source:.100}: {out:?}, peak {} MB", peak >> 20));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // A real conversation still renders: the limits are far above it.
    let template = ChatTemplate::chatml();
    let long = "word ".repeat(200_000);
    let messages: Vec<_> = (0..200)
        .map(|i| {
            ChatMessage::new(
                if i % 2 == 0 { "user" } else { "assistant" },
                &long[..5_000],
            )
        })
        .chain([ChatMessage::new("user", long.as_str())])
        .collect();
    let prompt = template
        .render(&messages, true)
        .expect("a long conversation renders");
    assert!(prompt.len() > 2_000_000);
}
