//! A safe layer over ggml's graph building.
//!
//! [`Graph`] owns one compute context for the length of one build and
//! computation ([`Graph::scope`] creates and frees it). Its nodes are
//! [`Tensor`] handles branded with the graph they belong to (an invariant
//! lifetime no two scopes share), so a node can neither outlive its context
//! nor be passed to another graph. Tensors that outlive graphs (model
//! weights, adapter factors, a session's KV cache) enter one through
//! [`Held`] and [`Graph::held`].
//!
//! Every op checks what ggml would otherwise `GGML_ASSERT`, which aborts the
//! whole process: operand shapes and types, that views stay inside the
//! tensor they look into (ggml itself checks only a view's contiguous size),
//! and that the context has room for one more tensor. A failed check is a
//! bug of the graph code, not of its input (shapes follow from the model
//! checked at load and the session's checked positions): it panics with the
//! op's name, which a host sees as an error instead of a dead process.
//! Custom ops are the one `unsafe` entry ([`Graph::custom1`] and friends):
//! what they read is up to their own contract, so their typed wrappers in
//! `build.rs` check it.

use std::ffi::c_void;
use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use ggml_sys_bleedingedge as sys;

use super::N_TASKS_MAX;
use crate::engine::GgmlErrorKind;
use crate::{Error, Result};

/// The brand tying a [`Tensor`] to its [`Graph`]: invariant in `'g`.
type Brand<'g> = PhantomData<fn(&'g ()) -> &'g ()>;

/// A tensor of graph `'g`: one of its nodes, or a [`Held`] tensor it reads.
/// A copyable handle; reading its shape is safe for as long as the graph
/// lives, which the brand guarantees.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tensor<'g> {
    raw: NonNull<sys::ggml_tensor>,
    _brand: Brand<'g>,
}

impl fmt::Debug for Tensor<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor(type {} {:?})", (*self).ty(), (*self).ne())
    }
}

impl<'g> Tensor<'g> {
    fn new(raw: *mut sys::ggml_tensor, op: &str) -> Tensor<'g> {
        Tensor {
            raw: NonNull::new(raw).unwrap_or_else(|| panic!("ggml {op}: no tensor returned")),
            _brand: PhantomData,
        }
    }

    fn get(self) -> &'g sys::ggml_tensor {
        // SAFETY: a live tensor of graph `'g` (or one that outlives it): its
        // metadata is only written by the op that created it.
        unsafe { self.raw.as_ref() }
    }

    /// Elements per dimension.
    pub(crate) fn ne(self) -> [i64; 4] {
        self.get().ne
    }

    /// Byte strides per dimension.
    pub(crate) fn nb(self) -> [usize; 4] {
        self.get().nb
    }

    /// The element type.
    pub(crate) fn ty(self) -> sys::ggml_type {
        self.get().type_
    }

    /// Whether it is F32.
    pub(crate) fn is_f32(self) -> bool {
        self.ty() == sys::ggml_type_GGML_TYPE_F32
    }

    /// Whether its elements lie in memory order without gaps.
    pub(crate) fn is_contiguous(self) -> bool {
        // SAFETY: reads the metadata of a live tensor.
        unsafe { sys::ggml_is_contiguous(self.raw.as_ptr()) }
    }

    /// Number of elements.
    pub(crate) fn nelements(self) -> i64 {
        self.ne().iter().product()
    }

    /// Bytes of its data (as ggml counts them).
    pub(crate) fn nbytes(self) -> usize {
        // SAFETY: reads the metadata of a live tensor.
        unsafe { sys::ggml_nbytes(self.raw.as_ptr()) }
    }

    /// The raw pointer, for a custom op's userdata or ggml calls made by
    /// the graph's computation.
    pub(crate) fn raw(self) -> *mut sys::ggml_tensor {
        self.raw.as_ptr()
    }

    /// Whether its third and fourth dimensions are 1.
    pub(crate) fn is_2d(self) -> bool {
        let ne = self.ne();
        ne[2] == 1 && ne[3] == 1
    }
}

/// A tensor that outlives every graph reading it: a model weight, an
/// adapter factor or a session's KV cache, in a context its owner frees on
/// drop. Crate-internal by design: a copy must not outlive its owner, and
/// every graph is built and computed within a borrow of the owners it reads.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct Held(NonNull<sys::ggml_tensor>);

impl Held {
    /// `raw` as a held tensor (`None` if null).
    ///
    /// # Safety
    /// `raw` is a valid tensor whose metadata and data stay valid while its
    /// owner lives, and the handle (and its copies) is only used meanwhile.
    pub(crate) unsafe fn new(raw: *mut sys::ggml_tensor) -> Option<Held> {
        NonNull::new(raw).map(Held)
    }

    fn get(&self) -> &sys::ggml_tensor {
        // SAFETY: valid while its owner lives (see `new`).
        unsafe { self.0.as_ref() }
    }

    /// Elements per dimension.
    pub(crate) fn ne(self) -> [i64; 4] {
        self.get().ne
    }

    /// The element type.
    pub(crate) fn ty(self) -> sys::ggml_type {
        self.get().type_
    }

    /// Its data pointer.
    pub(crate) fn data(self) -> *mut c_void {
        self.get().data
    }
}

/// `ggml_can_repeat(small, big)`: `small` broadcasts over `big`.
fn can_repeat(small: [i64; 4], big: [i64; 4]) -> bool {
    small.iter().zip(&big).all(|(&s, &b)| s > 0 && b % s == 0)
}

/// A graph under construction, its context, and the input data to copy in
/// once it is allocated.
pub(crate) struct Graph<'g> {
    ctx: NonNull<sys::ggml_context>,
    gf: NonNull<sys::ggml_cgraph>,
    /// Input tensors and the bytes they receive before the computation.
    pub(crate) inputs: Vec<(Tensor<'g>, Vec<u8>)>,
    /// Activations already quantized for the Q4_1 kernel: (F32 input, exact
    /// mode, Q8_1 node).
    pub(crate) quantized: Vec<(Tensor<'g>, bool, Tensor<'g>)>,
    /// Custom ops' userdata, kept (at a fixed address) until the graph is
    /// freed: see [`Graph::keep`].
    kept: Vec<Box<dyn std::any::Any>>,
    /// Shape source for custom ops' outputs, and its capacity in floats.
    shape: Option<(Tensor<'g>, usize)>,
    _brand: Brand<'g>,
}

impl Drop for Graph<'_> {
    fn drop(&mut self) {
        // SAFETY: the context came from ggml_init in `scope` and is freed
        // once; its metadata buffer is the caller's and stays.
        unsafe { sys::ggml_free(self.ctx.as_ptr()) }
    }
}

impl Graph<'_> {
    /// Runs `f` on a new graph of at most `nodes` nodes whose metadata lives
    /// in `meta` (sized by `meta_bytes(nodes)`); the context is freed when
    /// `f` returns or panics.
    pub(crate) fn scope<R>(
        meta: &mut [u8],
        nodes: usize,
        f: impl for<'g> FnOnce(&mut Graph<'g>) -> Result<R>,
    ) -> Result<R> {
        let params = sys::ggml_init_params {
            mem_size: meta.len(),
            mem_buffer: meta.as_mut_ptr().cast(),
            no_alloc: true,
        };
        // SAFETY: `meta` outlives the context, which the graph frees on drop.
        let ctx = NonNull::new(unsafe { sys::ggml_init(params) }).ok_or_else(|| {
            Error::ggml(
                GgmlErrorKind::Alloc,
                "ggml_init failed for the compute context",
            )
        })?;
        // SAFETY: a live context; the graph object is allocated in it (the
        // caller sized `meta` for it), null if it does not fit.
        let gf = unsafe { sys::ggml_new_graph_custom(ctx.as_ptr(), nodes, false) };
        let Some(gf) = NonNull::new(gf) else {
            // SAFETY: created just above, freed once.
            unsafe { sys::ggml_free(ctx.as_ptr()) };
            return Err(Error::ggml(
                GgmlErrorKind::Alloc,
                "no room for the graph in its context",
            ));
        };
        let mut g = Graph {
            ctx,
            gf,
            inputs: Vec::new(),
            quantized: Vec::new(),
            kept: Vec::new(),
            shape: None,
            _brand: PhantomData,
        };
        f(&mut g)
    }
}

impl<'g> Graph<'g> {
    /// The raw context and graph, for the computation (allocating,
    /// planning, computing): no tensor may be created through them.
    pub(crate) fn raw_parts(&self) -> (*mut sys::ggml_context, *mut sys::ggml_cgraph) {
        (self.ctx.as_ptr(), self.gf.as_ptr())
    }

    /// Panics unless the context has room for one more tensor (ggml would
    /// abort): the graph code sized it (`max_nodes`) too small.
    fn room(&self, op: &str) {
        // SAFETY: reads the bookkeeping of a live context.
        let (used, size, one) = unsafe {
            (
                sys::ggml_used_mem(self.ctx.as_ptr()),
                sys::ggml_get_mem_size(self.ctx.as_ptr()),
                sys::ggml_tensor_overhead(),
            )
        };
        assert!(
            used + one <= size,
            "ggml {op}: the graph's context is full ({used} of {size} bytes)"
        );
    }

    /// Creates one tensor with `make` after checking there is room for it.
    fn make(
        &mut self,
        op: &str,
        make: impl FnOnce(*mut sys::ggml_context) -> *mut sys::ggml_tensor,
    ) -> Tensor<'g> {
        self.room(op);
        Tensor::new(make(self.ctx.as_ptr()), op)
    }

    /// A held tensor as an operand of this graph.
    pub(crate) fn held(&self, h: Held) -> Tensor<'g> {
        Tensor {
            raw: h.0,
            _brand: PhantomData,
        }
    }

    /// A new tensor of type `ty` and shape `ne` (1 to 4 dimensions), data
    /// placed by the allocator.
    pub(crate) fn new_tensor(&mut self, ty: sys::ggml_type, ne: &[i64]) -> Tensor<'g> {
        assert!(
            (1..=4).contains(&ne.len()) && ne.iter().all(|&d| d > 0),
            "ggml new_tensor: bad shape {ne:?}"
        );
        // SAFETY: a live context with room; `ne` has 1..=4 positive sizes.
        self.make("new_tensor", |ctx| unsafe {
            sys::ggml_new_tensor(ctx, ty, ne.len() as i32, ne.as_ptr())
        })
    }

    /// Marks `t` as an input that receives `bytes` before the computation.
    pub(crate) fn mark_input(&mut self, t: Tensor<'g>, bytes: Vec<u8>) -> Tensor<'g> {
        assert_eq!(t.nbytes(), bytes.len(), "ggml input: size mismatch");
        // SAFETY: a tensor of this graph.
        unsafe { sys::ggml_set_input(t.raw()) };
        self.inputs.push((t, bytes));
        t
    }

    /// A 1-d I32 input holding `data`.
    pub(crate) fn input_i32(&mut self, data: &[i32]) -> Tensor<'g> {
        let t = self.new_tensor(sys::ggml_type_GGML_TYPE_I32, &[data.len().max(1) as i64]);
        let bytes = data.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.mark_input(t, bytes)
    }

    /// An F32 input of shape `ne` holding `data`.
    pub(crate) fn input_f32(&mut self, data: &[f32], ne: &[i64]) -> Tensor<'g> {
        let t = self.new_tensor(sys::ggml_type_GGML_TYPE_F32, ne);
        let bytes = data.iter().flat_map(|v| v.to_ne_bytes()).collect();
        self.mark_input(t, bytes)
    }

    /// Adds `t` and everything it depends on to the graph, in order.
    pub(crate) fn expand(&mut self, t: Tensor<'g>) {
        // SAFETY: a graph with room for every tensor of its context (sized
        // together), and a tensor of it.
        unsafe { sys::ggml_build_forward_expand(self.gf.as_ptr(), t.raw()) }
    }

    /// Marks `t` as the graph's output and adds it (see [`Graph::expand`]).
    pub(crate) fn set_output(&mut self, t: Tensor<'g>) {
        // SAFETY: a tensor of this graph.
        unsafe { sys::ggml_set_output(t.raw()) };
        self.expand(t);
    }

    /// `a · b` (ggml's `mul_mat`: rows of `a` dotted with columns of `b`).
    pub(crate) fn mul_mat(&mut self, a: Tensor<'g>, b: Tensor<'g>) -> Tensor<'g> {
        let (na, nb) = (a.ne(), b.ne());
        assert!(
            na[0] == nb[0] && nb[2] % na[2] == 0 && nb[3] % na[3] == 0,
            "ggml mul_mat: {a:?} by {b:?}"
        );
        // SAFETY: reads the metadata of a live tensor.
        let transposed = unsafe { sys::ggml_is_transposed(a.raw()) };
        assert!(!transposed, "ggml mul_mat: a transposed first operand");
        // SAFETY: operands checked as ggml requires.
        self.make("mul_mat", |ctx| unsafe {
            sys::ggml_mul_mat(ctx, a.raw(), b.raw())
        })
    }

    /// `a + b`, `b` broadcast over `a`.
    pub(crate) fn add(&mut self, a: Tensor<'g>, b: Tensor<'g>) -> Tensor<'g> {
        assert!(can_repeat(b.ne(), a.ne()), "ggml add: {a:?} + {b:?}");
        // SAFETY: operands checked as ggml requires.
        self.make("add", |ctx| unsafe { sys::ggml_add(ctx, a.raw(), b.raw()) })
    }

    /// `a * b` element-wise, `b` broadcast over `a`.
    pub(crate) fn mul(&mut self, a: Tensor<'g>, b: Tensor<'g>) -> Tensor<'g> {
        assert!(can_repeat(b.ne(), a.ne()), "ggml mul: {a:?} * {b:?}");
        // SAFETY: operands checked as ggml requires.
        self.make("mul", |ctx| unsafe { sys::ggml_mul(ctx, a.raw(), b.raw()) })
    }

    /// `a * s`.
    pub(crate) fn scale(&mut self, a: Tensor<'g>, s: f32) -> Tensor<'g> {
        assert!(a.is_contiguous(), "ggml scale: {a:?} is not contiguous");
        // SAFETY: a contiguous operand, as ggml requires.
        self.make("scale", |ctx| unsafe { sys::ggml_scale(ctx, a.raw(), s) })
    }

    /// RMS norm of each row of the F32 `a`.
    pub(crate) fn rms_norm(&mut self, a: Tensor<'g>, eps: f32) -> Tensor<'g> {
        assert!(
            a.is_f32() && a.nb()[0] == 4,
            "ggml rms_norm: {a:?} is not F32 rows"
        );
        // SAFETY: an F32 operand with packed rows, as ggml's kernel requires.
        self.make("rms_norm", |ctx| unsafe {
            sys::ggml_rms_norm(ctx, a.raw(), eps)
        })
    }

    /// Rows `ids` (I32) of the 2-d `a`. The ids are the caller's to check
    /// against `a`'s row count (ggml reads the row they name).
    pub(crate) fn get_rows(&mut self, a: Tensor<'g>, ids: Tensor<'g>) -> Tensor<'g> {
        let (na, ni) = (a.ne(), ids.ne());
        assert!(
            ids.ty() == sys::ggml_type_GGML_TYPE_I32 && na[2] == ni[1] && ni[3] == 1,
            "ggml get_rows: {a:?} by {ids:?}"
        );
        // SAFETY: operands checked as ggml requires.
        self.make("get_rows", |ctx| unsafe {
            sys::ggml_get_rows(ctx, a.raw(), ids.raw())
        })
    }

    /// The contiguous `a` seen as shape `ne` (2 or 3 dimensions).
    pub(crate) fn reshape(&mut self, a: Tensor<'g>, ne: &[i64]) -> Tensor<'g> {
        assert!(
            a.is_contiguous() && ne.iter().product::<i64>() == a.nelements(),
            "ggml reshape: {a:?} as {ne:?}"
        );
        // SAFETY: a contiguous operand of the same element count.
        self.make("reshape", |ctx| unsafe {
            match *ne {
                [ne0, ne1] => sys::ggml_reshape_2d(ctx, a.raw(), ne0, ne1),
                [ne0, ne1, ne2] => sys::ggml_reshape_3d(ctx, a.raw(), ne0, ne1, ne2),
                _ => panic!("ggml reshape: {} dimensions", ne.len()),
            }
        })
    }

    /// A view of `a`: shape `ne` (1 to 3 dimensions), byte strides `nb` for
    /// the dimensions after the first, starting `offset` bytes in. Panics
    /// unless every byte it covers lies inside `a`'s data.
    pub(crate) fn view(
        &mut self,
        a: Tensor<'g>,
        ne: &[i64],
        nb: &[usize],
        offset: usize,
    ) -> Tensor<'g> {
        assert!(
            (1..=3).contains(&ne.len()) && nb.len() + 1 == ne.len() && ne.iter().all(|&d| d > 0),
            "ggml view of {a:?}: shape {ne:?}, strides {nb:?}"
        );
        // SAFETY: reads the metadata of a live tensor.
        let (esz, blck) = unsafe {
            (
                sys::ggml_type_size(a.ty()),
                sys::ggml_blck_size(a.ty()) as i64,
            )
        };
        assert!(
            ne[0] % blck == 0,
            "ggml view of {a:?}: rows of {} elements",
            ne[0]
        );
        let row = esz * (ne[0] / blck) as usize;
        let last = ne[1..]
            .iter()
            .zip(nb)
            .map(|(&d, &s)| (d as usize - 1) * s)
            .sum::<usize>();
        let end = offset.checked_add(last).and_then(|e| e.checked_add(row));
        assert!(
            end.is_some_and(|e| e <= a.nbytes()),
            "ggml view of {a:?}: shape {ne:?}, strides {nb:?}, offset {offset} runs past its {} bytes",
            a.nbytes()
        );
        // SAFETY: the view lies inside `a` (checked just above).
        self.make("view", |ctx| unsafe {
            match (ne, nb) {
                (&[ne0], &[]) => sys::ggml_view_1d(ctx, a.raw(), ne0, offset),
                (&[ne0, ne1], &[nb1]) => sys::ggml_view_2d(ctx, a.raw(), ne0, ne1, nb1, offset),
                (&[ne0, ne1, ne2], &[nb1, nb2]) => {
                    sys::ggml_view_3d(ctx, a.raw(), ne0, ne1, ne2, nb1, nb2, offset)
                }
                _ => unreachable!("checked above"),
            }
        })
    }

    /// `a` with its axes permuted (axis `i` of `a` becomes axis `axes[i]`).
    pub(crate) fn permute(&mut self, a: Tensor<'g>, axes: [i32; 4]) -> Tensor<'g> {
        let mut seen = [false; 4];
        for &x in &axes {
            assert!(
                (0..4).contains(&x) && !std::mem::replace(&mut seen[x as usize], true),
                "ggml permute: axes {axes:?}"
            );
        }
        let [x0, x1, x2, x3] = axes;
        // SAFETY: a permutation of the four axes.
        self.make("permute", |ctx| unsafe {
            sys::ggml_permute(ctx, a.raw(), x0, x1, x2, x3)
        })
    }

    /// `a` with its first two axes swapped.
    pub(crate) fn transpose(&mut self, a: Tensor<'g>) -> Tensor<'g> {
        // SAFETY: any tensor can be transposed (a view).
        self.make("transpose", |ctx| unsafe {
            sys::ggml_transpose(ctx, a.raw())
        })
    }

    /// A contiguous copy of `a`, optionally reshaped to `[ne0, ne1]`.
    pub(crate) fn cont(&mut self, a: Tensor<'g>, shape: Option<[i64; 2]>) -> Tensor<'g> {
        match shape {
            // SAFETY: any tensor can be copied contiguous.
            None => self.make("cont", |ctx| unsafe { sys::ggml_cont(ctx, a.raw()) }),
            Some([ne0, ne1]) => {
                assert!(
                    ne0 * ne1 == a.nelements(),
                    "ggml cont of {a:?} as {shape:?}"
                );
                // SAFETY: the same element count, as ggml requires.
                self.make("cont", |ctx| unsafe {
                    sys::ggml_cont_2d(ctx, a.raw(), ne0, ne1)
                })
            }
        }
    }

    /// A node that copies `a` into `b` (converting the type); returns `b`'s
    /// new value.
    pub(crate) fn cpy(&mut self, a: Tensor<'g>, b: Tensor<'g>) -> Tensor<'g> {
        assert_eq!(a.nelements(), b.nelements(), "ggml cpy: {a:?} into {b:?}");
        // SAFETY: the same element count, as ggml requires.
        self.make("cpy", |ctx| unsafe { sys::ggml_cpy(ctx, a.raw(), b.raw()) })
    }

    /// `a` and `b` concatenated along their third axis (this ggml's
    /// `concat`).
    pub(crate) fn concat(&mut self, a: Tensor<'g>, b: Tensor<'g>) -> Tensor<'g> {
        let (na, nb) = (a.ne(), b.ne());
        assert!(
            na[0] == nb[0] && na[1] == nb[1] && na[3] == nb[3],
            "ggml concat: {a:?} and {b:?}"
        );
        // SAFETY: shapes checked as ggml requires.
        self.make("concat", |ctx| unsafe {
            sys::ggml_concat(ctx, a.raw(), b.raw())
        })
    }

    /// Keeps `data` until the graph is freed and returns its address, for a
    /// custom op's userdata (a box's contents do not move with the box).
    pub(crate) fn keep<T: 'static>(&mut self, data: Box<T>) -> *mut c_void {
        let at = &*data as *const T as *mut c_void;
        self.kept.push(data);
        at
    }

    /// An F32 `[ne0, ne1, ne2]` tensor that only gives a custom op its
    /// output shape: a view of one tensor per graph that nothing reads or
    /// writes, grown (replaced) when a larger shape is asked for.
    pub(crate) fn shape_3d(&mut self, ne0: i64, ne1: i64, ne2: i64) -> Tensor<'g> {
        assert!(
            ne0 > 0 && ne1 > 0 && ne2 > 0,
            "shape_3d: [{ne0}, {ne1}, {ne2}]"
        );
        let elems = (ne0 * ne1 * ne2) as usize;
        let (t, cap) = match self.shape {
            Some((t, cap)) if cap >= elems => (t, cap),
            _ => (
                self.new_tensor(sys::ggml_type_GGML_TYPE_F32, &[elems as i64]),
                elems,
            ),
        };
        self.shape = Some((t, cap));
        let nb = [4 * ne0 as usize, 4 * (ne0 * ne1) as usize];
        self.view(t, &[ne0, ne1, ne2], &nb, 0)
    }

    /// Custom op `fun(dst, a)` over as many tasks as threads; `dst` has
    /// `a`'s shape.
    ///
    /// # Safety
    /// `fun` may be called with these tensors and `userdata`, which stays
    /// valid until the graph is computed.
    pub(crate) unsafe fn custom1(
        &mut self,
        a: Tensor<'g>,
        fun: sys::ggml_custom1_op_t,
        userdata: *mut c_void,
    ) -> Tensor<'g> {
        // SAFETY: as this function's contract.
        self.make("map_custom1", |ctx| unsafe {
            sys::ggml_map_custom1(ctx, a.raw(), fun, N_TASKS_MAX, userdata)
        })
    }

    /// Custom op `fun(dst, a, b)`; `dst` has `a`'s shape.
    ///
    /// # Safety
    /// As [`Graph::custom1`].
    pub(crate) unsafe fn custom2(
        &mut self,
        a: Tensor<'g>,
        b: Tensor<'g>,
        fun: sys::ggml_custom2_op_t,
        userdata: *mut c_void,
    ) -> Tensor<'g> {
        // SAFETY: as this function's contract.
        self.make("map_custom2", |ctx| unsafe {
            sys::ggml_map_custom2(ctx, a.raw(), b.raw(), fun, N_TASKS_MAX, userdata)
        })
    }

    /// Custom op `fun(dst, a, b, c)`; `dst` has `a`'s shape.
    ///
    /// # Safety
    /// As [`Graph::custom1`].
    pub(crate) unsafe fn custom3(
        &mut self,
        a: Tensor<'g>,
        b: Tensor<'g>,
        c: Tensor<'g>,
        fun: sys::ggml_custom3_op_t,
        userdata: *mut c_void,
    ) -> Tensor<'g> {
        // SAFETY: as this function's contract.
        self.make("map_custom3", |ctx| unsafe {
            sys::ggml_map_custom3(ctx, a.raw(), b.raw(), c.raw(), fun, N_TASKS_MAX, userdata)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(nodes: usize) -> Vec<u8> {
        // SAFETY: pure size computations.
        vec![
            0u8;
            unsafe {
                sys::ggml_tensor_overhead() * nodes + sys::ggml_graph_overhead_custom(nodes, false)
            }
        ]
    }

    #[test]
    fn ops_check_shapes_and_views_before_ggml_does() {
        let mut m = meta(64);
        Graph::scope(&mut m, 64, |g| {
            let a = g.input_f32(&[0.0; 12], &[4, 3]);
            let b = g.input_f32(&[0.0; 8], &[4, 2]);
            let p = g.mul_mat(a, b);
            assert_eq!(p.ne(), [3, 2, 1, 1]);
            let row = g.input_f32(&[0.0; 3], &[3]);
            assert_eq!(g.add(p, row).ne(), [3, 2, 1, 1]);
            // A strided view inside `a`, then one row too many.
            assert_eq!(g.view(a, &[2, 3], &[16], 8).ne(), [2, 3, 1, 1]);
            let refused = |r: std::thread::Result<()>| assert!(r.is_err());
            use std::panic::{catch_unwind, AssertUnwindSafe as Safe};
            refused(catch_unwind(Safe(|| {
                g.view(a, &[2, 4], &[16], 8);
            })));
            refused(catch_unwind(Safe(|| {
                g.view(a, &[4, 3], &[16], 4);
            })));
            refused(catch_unwind(Safe(|| {
                g.mul_mat(a, row);
            })));
            refused(catch_unwind(Safe(|| {
                g.add(row, a);
            })));
            refused(catch_unwind(Safe(|| {
                g.reshape(a, &[5, 2]);
            })));
            refused(catch_unwind(Safe(|| {
                g.permute(a, [0, 0, 1, 2]);
            })));
            refused(catch_unwind(Safe(|| {
                g.cpy(a, b);
            })));
            let ids = g.input_i32(&[0, 2]);
            refused(catch_unwind(Safe(|| {
                g.get_rows(a, a);
            })));
            assert_eq!(g.get_rows(a, ids).ne(), [4, 2, 1, 1]);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn a_full_context_panics_instead_of_aborting() {
        let mut m = meta(8);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Graph::scope(&mut m, 8, |g| {
                let mut t = g.input_f32(&[1.0], &[1]);
                for _ in 0..100 {
                    t = g.scale(t, 2.0);
                }
                Ok(t.ne())
            })
        }));
        assert!(r.is_err());
    }
}
