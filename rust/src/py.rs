//! The Python binding: converts arrays and strings, releases the GIL, raises clear errors.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::{codec, dtw, perfect, spans, topk, transfer, vocab_map, whole_text};
use pyo3::types::PyBytes;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

fn to_chars(tokens: &[String]) -> Vec<Vec<char>> {
    tokens.iter().map(|t| t.chars().collect()).collect()
}

fn path_array<'py>(py: Python<'py>, path: &[(u32, u32)]) -> Bound<'py, PyArray2<i64>> {
    let flat: Vec<i64> = path.iter().flat_map(|&(i, j)| [i64::from(i), i64::from(j)]).collect();
    Array2::from_shape_vec((path.len(), 2), flat).expect("pairs").into_pyarray(py)
}

/// The pool of each thread count asked for, started once per process: a call costs no thread starts
/// (a store is aligned in thousands of calls, and a farm node may ask for 64 threads).
fn pool(threads: usize) -> Result<Arc<rayon::ThreadPool>, String> {
    static POOLS: OnceLock<Mutex<HashMap<usize, Arc<rayon::ThreadPool>>>> = OnceLock::new();
    let mut pools = POOLS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    if let Some(p) = pools.get(&threads) {
        return Ok(p.clone());
    }
    let p = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| format!("cannot start {threads} threads: {e}"))?);
    pools.insert(threads, p.clone());
    Ok(p)
}

/// Runs `f` on a rayon pool of `threads` workers (the global pool when None).
fn on_pool<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    match threads {
        None => Ok(f()),
        Some(0) => Err(PyValueError::new_err("threads must be at least 1")),
        Some(t) => Ok(pool(t).map_err(PyValueError::new_err)?.install(f)),
    }
}

fn check_nonempty(what: &str, len: usize) -> PyResult<()> {
    if len == 0 {
        return Err(PyValueError::new_err(format!("{what} token sequence is empty: nothing to align")));
    }
    Ok(())
}

/// A vocabulary's token strings, converted once so that alignments can be asked for by token ids.
#[pyclass(module = "fusekit._core", frozen)]
pub struct TokenTable {
    tokens: Vec<Vec<char>>,
}

#[pymethods]
impl TokenTable {
    #[new]
    fn new(tokens: Vec<String>) -> Self {
        TokenTable { tokens: to_chars(&tokens) }
    }

    fn __len__(&self) -> usize {
        self.tokens.len()
    }
}

impl TokenTable {
    fn lookup(&self, ids: &[i64], what: &str) -> PyResult<Vec<Vec<char>>> {
        ids.iter()
            .map(|&id| {
                usize::try_from(id)
                    .ok()
                    .and_then(|i| self.tokens.get(i))
                    .cloned()
                    .ok_or_else(|| {
                        PyValueError::new_err(format!(
                            "{what} token id {id} is outside its vocabulary of {} entries",
                            self.tokens.len()
                        ))
                    })
            })
            .collect()
    }
}

#[pyfunction]
fn align_tokens<'py>(py: Python<'py>, src: Vec<String>, tgt: Vec<String>) -> PyResult<Bound<'py, PyArray2<i64>>> {
    check_nonempty("source", src.len())?;
    check_nonempty("target", tgt.len())?;
    let (a, b) = (to_chars(&src), to_chars(&tgt));
    let path = py.detach(|| dtw::align(&a, &b));
    Ok(path_array(py, &path))
}

#[pyfunction]
#[pyo3(signature = (pairs, threads=None))]
fn align_tokens_batch<'py>(
    py: Python<'py>,
    pairs: Vec<(Vec<String>, Vec<String>)>,
    threads: Option<usize>,
) -> PyResult<Vec<Bound<'py, PyArray2<i64>>>> {
    let mut seqs = Vec::with_capacity(pairs.len());
    for (n, (s, t)) in pairs.iter().enumerate() {
        check_nonempty(&format!("pair {n}: source"), s.len())?;
        check_nonempty(&format!("pair {n}: target"), t.len())?;
        seqs.push((to_chars(s), to_chars(t)));
    }
    let paths = py.detach(|| on_pool(threads, || seqs.par_iter().map(|(a, b)| dtw::align(a, b)).collect::<Vec<_>>()))?;
    Ok(paths.iter().map(|p| path_array(py, p)).collect())
}

/// Align many (source ids, target ids) pairs through two token tables, in parallel.
#[pyfunction]
#[pyo3(signature = (src_table, tgt_table, pairs, threads=None))]
fn align_ids_batch<'py>(
    py: Python<'py>,
    src_table: &TokenTable,
    tgt_table: &TokenTable,
    pairs: Vec<(PyReadonlyArray1<'py, i64>, PyReadonlyArray1<'py, i64>)>,
    threads: Option<usize>,
) -> PyResult<Vec<Bound<'py, PyArray2<i64>>>> {
    let mut seqs = Vec::with_capacity(pairs.len());
    for (n, (s, t)) in pairs.iter().enumerate() {
        let (s, t) = (s.as_slice()?, t.as_slice()?);
        check_nonempty(&format!("pair {n}: source"), s.len())?;
        check_nonempty(&format!("pair {n}: target"), t.len())?;
        seqs.push((src_table.lookup(s, "source")?, tgt_table.lookup(t, "target")?));
    }
    let paths = py.detach(|| on_pool(threads, || seqs.par_iter().map(|(a, b)| dtw::align(a, b)).collect::<Vec<_>>()))?;
    Ok(paths.iter().map(|p| path_array(py, p)).collect())
}

/// Returns (map, number of exact matches).
#[pyfunction]
#[pyo3(signature = (src_vocab, tgt_vocab, threads=None, tgt_usable=None))]
fn map_vocab<'py>(
    py: Python<'py>,
    src_vocab: Vec<String>,
    tgt_vocab: Vec<String>,
    threads: Option<usize>,
    tgt_usable: Option<Vec<bool>>,
) -> PyResult<(Bound<'py, PyArray1<i64>>, usize)> {
    let usable = tgt_usable.unwrap_or_else(|| vec![true; tgt_vocab.len()]);
    if usable.len() != tgt_vocab.len() {
        return Err(PyValueError::new_err(format!(
            "tgt_usable has {} entries for a target vocabulary of {}",
            usable.len(),
            tgt_vocab.len()
        )));
    }
    if !usable.iter().any(|&u| u) {
        return Err(PyValueError::new_err("target vocabulary is empty: nothing to map onto"));
    }
    let (a, b) = (to_chars(&src_vocab), to_chars(&tgt_vocab));
    let (map, stats) = py.detach(|| on_pool(threads, || vocab_map::map_vocab_masked(&a, &b, &usable)))?;
    let map: Vec<i64> = map.into_iter().map(i64::from).collect();
    Ok((map.into_pyarray(py), stats.exact))
}

#[allow(clippy::type_complexity)]
#[pyfunction]
fn align_topk<'py>(
    py: Python<'py>,
    path: PyReadonlyArray2<'py, i64>,
    src_ids: PyReadonlyArray1<'py, i64>,
    tgt_ids: PyReadonlyArray1<'py, i64>,
    vocab_map: PyReadonlyArray1<'py, i64>,
    src_topk_ids: PyReadonlyArray2<'py, i64>,
    src_topk_logp: PyReadonlyArray2<'py, f32>,
) -> PyResult<(
    Bound<'py, PyArray2<i32>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyArray1<i32>>,
)> {
    let path_view = path.as_array();
    if path_view.ncols() != 2 {
        return Err(PyValueError::new_err(format!("path must have shape (P, 2), got {:?}", path_view.shape())));
    }
    let to_u32 = |v: i64, what: &str| -> PyResult<u32> {
        u32::try_from(v).map_err(|_| PyValueError::new_err(format!("{what} value {v} is negative or too large")))
    };
    let pairs: Vec<(u32, u32)> = path_view
        .rows()
        .into_iter()
        .map(|r| Ok((to_u32(r[0], "path")?, to_u32(r[1], "path")?)))
        .collect::<PyResult<_>>()?;
    let src: Vec<u32> = src_ids.as_array().iter().map(|&v| to_u32(v, "src_ids")).collect::<PyResult<_>>()?;
    let tgt: Vec<u32> = tgt_ids.as_array().iter().map(|&v| to_u32(v, "tgt_ids")).collect::<PyResult<_>>()?;
    // −1 in the map: a source id with no target counterpart (special, padded): its mass is dropped.
    let vmap: Vec<u32> = vocab_map
        .as_array()
        .iter()
        .map(|&v| if v == -1 { Ok(topk::UNMAPPED) } else { to_u32(v, "vocab_map") })
        .collect::<PyResult<_>>()?;
    let ids_view = src_topk_ids.as_array();
    let logp_view = src_topk_logp.as_array();
    if ids_view.shape() != logp_view.shape() {
        return Err(PyValueError::new_err(format!(
            "src_topk_ids {:?} and src_topk_logp {:?} must have the same shape",
            ids_view.shape(),
            logp_view.shape()
        )));
    }
    if ids_view.nrows() != src.len() {
        return Err(PyValueError::new_err(format!(
            "src_topk arrays have {} rows but there are {} source tokens",
            ids_view.nrows(),
            src.len()
        )));
    }
    let k = ids_view.ncols();
    let topk_ids: Vec<i32> = ids_view
        .iter()
        .map(|&v| i32::try_from(v).map_err(|_| PyValueError::new_err(format!("src_topk_ids value {v} out of range"))))
        .collect::<PyResult<_>>()?;
    let topk_logp: Vec<f32> = logp_view.iter().copied().collect();
    let (n, k_out) = (tgt.len(), k);
    let out = py
        .detach(|| {
            topk::align_topk(&topk::TopkInputs {
                path: &pairs,
                src_ids: &src,
                tgt_ids: &tgt,
                vocab_map: &vmap,
                src_topk_ids: &topk_ids,
                src_topk_logp: &topk_logp,
                k,
            })
        })
        .map_err(|e| PyValueError::new_err(e.to_string()))?;
    Ok((
        Array2::from_shape_vec((n, k_out), out.ids).expect("shape").into_pyarray(py),
        Array2::from_shape_vec((n, k_out), out.probs).expect("shape").into_pyarray(py),
        out.carried.into_pyarray(py),
        out.src_pos.into_pyarray(py),
    ))
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TokenTable>()?;
    m.add_function(wrap_pyfunction!(align_tokens, m)?)?;
    m.add_function(wrap_pyfunction!(align_tokens_batch, m)?)?;
    m.add_function(wrap_pyfunction!(align_ids_batch, m)?)?;
    m.add_function(wrap_pyfunction!(map_vocab, m)?)?;
    m.add_function(wrap_pyfunction!(align_topk, m)?)?;
    m.add_class::<TransferSource>()?;
    m.add_class::<TransferTarget>()?;
    m.add_function(wrap_pyfunction!(transfer_texts, m)?)?;
    m.add_function(wrap_pyfunction!(remap_spans, m)?)?;
    m.add_function(wrap_pyfunction!(perfect_topk_ids, m)?)?;
    m.add_function(wrap_pyfunction!(codec_encode_windows, m)?)?;
    m.add_function(wrap_pyfunction!(codec_decode_windows, m)?)?;
    m.add_function(wrap_pyfunction!(codec_train_prior, m)?)?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The extraction store's top-k codec (see codec.rs for the format)

struct OwnedWindow {
    input: Vec<u32>,
    offsets: Vec<i64>,
    char_start: i64,
    topk: Vec<u32>,
    logp: Vec<f32>,
    ce: Vec<f32>,
    mask: Option<Vec<bool>>,
}

type WindowArrays<'py> = (
    PyReadonlyArray1<'py, u32>,
    PyReadonlyArray1<'py, i64>,
    i64,
    PyReadonlyArray2<'py, u32>,
    PyReadonlyArray2<'py, f32>,
    PyReadonlyArray1<'py, f32>,
    Option<PyReadonlyArray1<'py, bool>>,
);

fn codec_params(k: usize, step: f64, knee: f64) -> PyResult<codec::Params> {
    if k == 0 {
        return Err(PyValueError::new_err("k must be at least 1"));
    }
    if !(step > 0.0 && step.is_finite()) {
        return Err(PyValueError::new_err(format!("step must be a positive number, got {step}")));
    }
    if !(knee >= 0.0 && knee.is_finite()) {
        return Err(PyValueError::new_err(format!("knee must be a number ≥ 0, got {knee}")));
    }
    Ok(codec::Params { k, step, knee })
}

impl OwnedWindow {
    fn view(&self) -> codec::WindowIn<'_> {
        codec::WindowIn {
            input: &self.input,
            offsets: &self.offsets,
            char_start: self.char_start,
            topk: &self.topk,
            logp: &self.logp,
            ce: &self.ce,
            mask: self.mask.as_deref(),
        }
    }
}

/// Copy the numpy windows out, so the coding can run without the GIL.
fn owned_windows(windows: &[WindowArrays<'_>], k: usize) -> PyResult<Vec<OwnedWindow>> {
    let mut owned = Vec::with_capacity(windows.len());
    for (i, (input, offsets, char_start, topk, logp, ce, mask)) in windows.iter().enumerate() {
        let (ts, ls) = (topk.as_array().dim(), logp.as_array().dim());
        if ts.1 != k || ls.1 != k {
            return Err(PyValueError::new_err(format!(
                "window {i}: top-k arrays have shapes {ts:?} and {ls:?} but k = {k}"
            )));
        }
        owned.push(OwnedWindow {
            input: input.as_slice()?.to_vec(),
            offsets: offsets.as_slice()?.to_vec(),
            char_start: *char_start,
            topk: topk.as_slice()?.to_vec(),
            logp: logp.as_slice()?.to_vec(),
            ce: ce.as_slice()?.to_vec(),
            mask: match mask {
                Some(m) => Some(m.as_slice()?.to_vec()),
                None => None,
            },
        });
    }
    Ok(owned)
}

fn codec_prior(levels: Option<&[u8]>) -> PyResult<Option<codec::Prior>> {
    levels.map(codec::Prior::from_levels).transpose().map_err(|e| PyValueError::new_err(e.to_string()))
}

/// Learn a shard's codec prior from its windows (the same tuples as `codec_encode_windows`): bytes,
/// one level per adaptive cell. Counted in parallel; the result does not depend on `threads`.
#[pyfunction]
#[pyo3(signature = (windows, k, step, threads=None, knee=0.0))]
fn codec_train_prior<'py>(
    py: Python<'py>,
    windows: Vec<WindowArrays<'py>>,
    k: usize,
    step: f64,
    threads: Option<usize>,
    knee: f64,
) -> PyResult<Bound<'py, PyBytes>> {
    let params = codec_params(k, step, knee)?;
    let owned = owned_windows(&windows, k)?;
    let counts = py.detach(|| {
        on_pool(threads, || {
            owned
                .par_iter()
                .enumerate()
                .try_fold(codec::Counts::default, |mut acc, (i, w)| {
                    codec::count_window(&w.view(), params, &mut acc).map_err(|e| format!("window {i}: {e}"))?;
                    Ok::<_, String>(acc)
                })
                .try_reduce(codec::Counts::default, |a, b| Ok(a.merge(b)))
        })
    })?
    .map_err(PyValueError::new_err)?;
    Ok(PyBytes::new(py, codec::Prior::from_counts(&counts).levels()))
}

/// Encode windows (input ranks, offsets, char_start, top-k ranks [n, k], log-probs [n, k], CE [n], mask
/// or None) in parallel; returns (bytes, Σ KL, max KL) per window. `knee` widens the log-prob grid
/// for unlikely slots (0: uniform grid of `step` nats; see codec.rs). `prior`: the levels from
/// `codec_train_prior` every window's models start from (None: fresh models, format "topk-rc/1").
#[pyfunction]
#[pyo3(signature = (windows, k, step, threads=None, knee=0.0, prior=None))]
fn codec_encode_windows<'py>(
    py: Python<'py>,
    windows: Vec<WindowArrays<'py>>,
    k: usize,
    step: f64,
    threads: Option<usize>,
    knee: f64,
    prior: Option<&[u8]>,
) -> PyResult<Vec<(Bound<'py, PyBytes>, f64, f64)>> {
    let params = codec_params(k, step, knee)?;
    let prior = codec_prior(prior)?;
    let owned = owned_windows(&windows, k)?;
    let encoded = py.detach(|| {
        on_pool(threads, || {
            owned.par_iter().map(|w| codec::encode_window(&w.view(), params, prior.as_ref())).collect::<Vec<_>>()
        })
    })?;
    encoded
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let e = r.map_err(|e| PyValueError::new_err(format!("window {i}: {e}")))?;
            Ok((PyBytes::new(py, &e.bytes), e.kl_sum, e.kl_max))
        })
        .collect()
}

#[allow(clippy::type_complexity)]
type DecodedArrays<'py> = (
    Bound<'py, PyArray1<u32>>,
    Bound<'py, PyArray1<i64>>,
    Bound<'py, PyArray2<u32>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<f32>>,
    Option<Bound<'py, PyArray1<bool>>>,
);

/// Decode windows given (bytes, n tokens, char_start, has_mask) each; returns per window
/// (input ranks, offsets, top-k ranks [n, k], log-probs [n, k], CE [n], mask or None). `prior`: the
/// levels the windows were encoded with (None: fresh models).
#[pyfunction]
#[pyo3(signature = (windows, k, step, threads=None, knee=0.0, prior=None))]
fn codec_decode_windows<'py>(
    py: Python<'py>,
    windows: Vec<(Vec<u8>, usize, i64, bool)>,
    k: usize,
    step: f64,
    threads: Option<usize>,
    knee: f64,
    prior: Option<&[u8]>,
) -> PyResult<Vec<DecodedArrays<'py>>> {
    let params = codec_params(k, step, knee)?;
    let prior = codec_prior(prior)?;
    let decoded = py.detach(|| {
        on_pool(threads, || {
            windows
                .par_iter()
                .map(|(bytes, n, char_start, has_mask)| {
                    codec::decode_window(bytes, *n, params, *has_mask, prior.as_ref()).map(|mut w| {
                        codec::shift_offsets(&mut w, *char_start);
                        w
                    })
                })
                .collect::<Vec<_>>()
        })
    })?;
    decoded
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let w = r.map_err(|e| PyValueError::new_err(format!("window {i}: {e}")))?;
            let n = w.input.len();
            Ok((
                w.input.into_pyarray(py),
                w.offsets.into_pyarray(py),
                Array2::from_shape_vec((n, k), w.topk).expect("shape").into_pyarray(py),
                Array2::from_shape_vec((n, k), w.logp).expect("shape").into_pyarray(py),
                w.ce.into_pyarray(py),
                w.mask.map(|m| m.into_pyarray(py)),
            ))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Byte-span transfer (see transfer.rs)

fn byte_strings(tokens: &[Bound<'_, PyBytes>]) -> Vec<Vec<u8>> {
    tokens.iter().map(|t| t.as_bytes().to_vec()).collect()
}

/// A source vocabulary for `transfer_texts`: byte strings (empty for special / padded ids), its end-of-sequence
/// and end-of-turn ids.
#[pyclass(module = "fusekit._core", frozen)]
pub struct TransferSource {
    vocab: transfer::SourceVocab,
}

#[pymethods]
impl TransferSource {
    #[new]
    #[pyo3(signature = (tokens, eos=None, eot=None))]
    fn new(tokens: Vec<Bound<'_, PyBytes>>, eos: Option<u32>, eot: Option<u32>) -> Self {
        TransferSource { vocab: transfer::SourceVocab { tokens: byte_strings(&tokens), ends: transfer::Ends { eos, eot } } }
    }

    fn __len__(&self) -> usize {
        self.vocab.tokens.len()
    }

    /// int64 [n, 2]: byte spans in `text` (UTF-8 bytes) of tokens `ids` starting at characters `starts`.
    fn spans<'py>(&self, py: Python<'py>, text: &[u8], ids: PyReadonlyArray1<'py, i64>, starts: PyReadonlyArray1<'py, i64>) -> PyResult<Bound<'py, PyArray2<i64>>> {
        token_spans(py, &self.vocab.tokens, text, ids, starts)
    }
}

/// A target vocabulary for `transfer_texts`: byte strings, which ids may receive mass, the preference
/// among ids with equal bytes (lower rank wins), its end-of-sequence and end-of-turn ids.
#[pyclass(module = "fusekit._core", frozen)]
pub struct TransferTarget {
    vocab: transfer::TargetVocab,
}

#[pymethods]
impl TransferTarget {
    #[new]
    #[pyo3(signature = (tokens, usable, rank, eos=None, eot=None))]
    fn new(tokens: Vec<Bound<'_, PyBytes>>, usable: Vec<bool>, rank: Vec<u8>, eos: Option<u32>, eot: Option<u32>) -> PyResult<Self> {
        if usable.len() != tokens.len() || rank.len() != tokens.len() {
            return Err(PyValueError::new_err("tokens, usable and rank must have the same length"));
        }
        Ok(TransferTarget { vocab: transfer::TargetVocab::new(&byte_strings(&tokens), &usable, &rank, transfer::Ends { eos, eot }) })
    }

    fn __len__(&self) -> usize {
        self.vocab.size
    }

    /// int64 [n, 2]: byte spans in `text` (UTF-8 bytes) of tokens `ids` starting at characters `starts`.
    fn spans<'py>(&self, py: Python<'py>, text: &[u8], ids: PyReadonlyArray1<'py, i64>, starts: PyReadonlyArray1<'py, i64>) -> PyResult<Bound<'py, PyArray2<i64>>> {
        token_spans(py, &self.vocab.tokens, text, ids, starts)
    }

    /// The id the transfer gives these bytes (None when no emittable target token has them).
    fn exact(&self, token: &[u8]) -> Option<u32> {
        self.vocab.exact(token)
    }
}

type Spans = Vec<(u32, u32)>;

fn owned_positions(pos: &PyReadonlyArrayDyn<'_, i64>, n: usize, what: &str) -> Result<whole_text::Positions, String> {
    let v = pos.as_array();
    match v.shape() {
        [len] if *len == n => Ok(whole_text::Positions::Starts(v.iter().copied().collect())),
        [len, 2] if *len == n => v
            .as_slice()
            .map(|flat| flat.to_vec())
            .unwrap_or_else(|| v.iter().copied().collect())
            .chunks(2)
            .map(|r| match (u32::try_from(r[0]), u32::try_from(r[1])) {
                (Ok(s), Ok(e)) => Ok((s, e)),
                _ => Err(format!("{what} span ({}, {}) is negative or too large", r[0], r[1])),
            })
            .collect::<Result<Spans, _>>()
            .map(whole_text::Positions::Spans),
        shape => Err(format!(
            "{what} positions must be {n} character starts or byte spans of shape ({n}, 2), got shape {shape:?}"
        )),
    }
}

/// (target text, source text or None (the same), source ids [m], source positions, target ids [n], target
/// positions, source top-k ids [m, k], log-probs [m, k], log p of each row's true next source token [m]
/// or None, perfect-source seed or None). Positions: character starts [len] or byte spans [len, 2].
type TextArrays<'py> = (
    Bound<'py, PyBytes>,
    Option<Bound<'py, PyBytes>>,
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArrayDyn<'py, i64>,
    PyReadonlyArray1<'py, i64>,
    PyReadonlyArrayDyn<'py, i64>,
    PyReadonlyArray2<'py, i64>,
    PyReadonlyArray2<'py, f32>,
    Option<PyReadonlyArray1<'py, f32>>,
    Option<u64>,
);

fn owned_text(item: &TextArrays<'_>, perfect_logp: (f32, f32)) -> Result<whole_text::TextJob, String> {
    let (text, src_text, src_ids, src_pos, tgt_ids, tgt_pos, topk_ids, topk_logp, true_logp, seed) = item;
    let ids = |a: &PyReadonlyArray1<'_, i64>, what: &str| -> Result<Vec<u32>, String> {
        a.as_array().iter().map(|&v| u32::try_from(v).map_err(|_| format!("{what} id {v} is negative or too large"))).collect()
    };
    let (iv, lv) = (topk_ids.as_array(), topk_logp.as_array());
    if iv.shape() != lv.shape() {
        return Err(format!("top-k ids {:?} and log-probs {:?} differ in shape", iv.shape(), lv.shape()));
    }
    let src_ids = ids(src_ids, "source")?;
    let tgt_ids = ids(tgt_ids, "target")?;
    let k = iv.ncols();
    Ok(whole_text::TextJob {
        text: text.as_bytes().to_vec(),
        src_text: src_text.as_ref().map(|t| t.as_bytes().to_vec()),
        src_pos: owned_positions(src_pos, src_ids.len(), "source")?,
        tgt_pos: owned_positions(tgt_pos, tgt_ids.len(), "target")?,
        src_ids,
        tgt_ids,
        topk_ids: iv.iter().map(|&v| i32::try_from(v).unwrap_or(-1)).collect(),
        topk_logp: lv.iter().copied().collect(),
        true_logp: true_logp.as_ref().map(|a| a.as_array().iter().copied().collect()).unwrap_or_default(),
        k,
        perfect: seed.map(|seed| whole_text::Perfect { seed, k, logp_true: perfect_logp.0, logp_other: perfect_logp.1 }),
    })
}

type TransferArrays<'py> = (
    Bound<'py, PyArray2<i32>>,
    Bound<'py, PyArray2<f32>>,
    Bound<'py, PyArray1<bool>>,
    Bound<'py, PyArray1<f32>>,
    Bound<'py, PyArray1<u8>>,
    Bound<'py, PyArray1<i32>>,
    Option<Bound<'py, PyArray1<bool>>>,
    Bound<'py, PyArray1<f32>>,
);

/// Transfer many texts' source top-k onto their target tokens, in parallel over texts with the GIL
/// released: byte spans (from character starts where not given), the source's spans carried into the
/// target's text where the source rendered its own, the transfer, and where a text names a seed the
/// perfect source's recall. Items: `TextArrays`. `perfect_logp`: (log p on the true token, on each
/// other id) of the perfect source. Returns per item (ids [n, out_k] i32, probs [n, out_k] f32,
/// carried [n], true_mass [n] f32, kind [n] u8, src_row [n] i32, recalled [n − 1] or None, kept_mass [n]
/// f32: each row's mass before its renormalisation, NaN where nothing carried). The result does not
/// depend on `threads`.
#[pyfunction]
#[pyo3(signature = (source, target, items, out_k, threads=None, perfect_logp=(0.0, 0.0)))]
fn transfer_texts<'py>(
    py: Python<'py>,
    source: &TransferSource,
    target: &TransferTarget,
    items: Vec<TextArrays<'py>>,
    out_k: usize,
    threads: Option<usize>,
    perfect_logp: (f32, f32),
) -> PyResult<Vec<TransferArrays<'py>>> {
    let jobs: Vec<whole_text::TextJob> = items
        .iter()
        .enumerate()
        .map(|(n, it)| owned_text(it, perfect_logp).map_err(|e| PyValueError::new_err(format!("text {n}: {e}"))))
        .collect::<PyResult<_>>()?;
    let results = py.detach(|| {
        on_pool(threads, || jobs.par_iter().map(|job| whole_text::run_text(job, &source.vocab, &target.vocab, out_k)).collect::<Vec<_>>())
    })?;
    results
        .into_iter()
        .enumerate()
        .map(|(n, r)| {
            let r = r.map_err(|e| PyValueError::new_err(format!("text {n}: {e}")))?;
            let t = r.transfer;
            let rows = t.carried.len();
            Ok((
                Array2::from_shape_vec((rows, out_k), t.ids).expect("shape").into_pyarray(py),
                Array2::from_shape_vec((rows, out_k), t.probs).expect("shape").into_pyarray(py),
                t.carried.into_pyarray(py),
                t.true_mass.into_pyarray(py),
                t.kind.into_pyarray(py),
                t.src_row.into_pyarray(py),
                r.recalled.map(|v| v.into_pyarray(py)),
                t.kept_mass.into_pyarray(py),
            ))
        })
        .collect()
}

fn spans_array<'py>(py: Python<'py>, spans: &[(usize, usize)]) -> Bound<'py, PyArray2<i64>> {
    let flat: Vec<i64> = spans.iter().flat_map(|&(s, e)| [s as i64, e as i64]).collect();
    Array2::from_shape_vec((spans.len(), 2), flat).expect("pairs").into_pyarray(py)
}

/// int64 [n, 2]: byte spans of tokens `ids` (vocabulary `table`) starting at character offsets `starts`.
fn token_spans<'py>(
    py: Python<'py>,
    table: &[Vec<u8>],
    text: &[u8],
    ids: PyReadonlyArray1<'py, i64>,
    starts: PyReadonlyArray1<'py, i64>,
) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let starts: Vec<i64> = starts.as_array().iter().copied().collect();
    let tokens: Vec<&[u8]> = ids
        .as_array()
        .iter()
        .map(|&id| {
            usize::try_from(id).ok().and_then(|i| table.get(i)).map(|t| t.as_slice()).ok_or_else(|| {
                PyValueError::new_err(format!("token id {id} is outside its vocabulary of {} entries", table.len()))
            })
        })
        .collect::<PyResult<_>>()?;
    let spans = py.detach(|| spans::byte_spans(text, &starts, &tokens)).map_err(|e| PyValueError::new_err(e.0))?;
    Ok(spans_array(py, &spans))
}

/// int64 [m, 2]: source byte `spans` (in `src_text`) as byte spans in `tgt_text` (`spans::remap_spans`).
#[pyfunction]
fn remap_spans<'py>(py: Python<'py>, src_text: &[u8], tgt_text: &[u8], spans: PyReadonlyArray2<'py, i64>) -> PyResult<Bound<'py, PyArray2<i64>>> {
    let v = spans.as_array();
    if v.ncols() != 2 {
        return Err(PyValueError::new_err(format!("spans must have shape (m, 2), got {:?}", v.shape())));
    }
    let pairs: Vec<(usize, usize)> = v
        .rows()
        .into_iter()
        .map(|r| match (usize::try_from(r[0]), usize::try_from(r[1])) {
            (Ok(s), Ok(e)) if s <= e && e <= src_text.len() => Ok((s, e)),
            _ => Err(PyValueError::new_err(format!("span ({}, {}) is not inside the source text of {} bytes", r[0], r[1], src_text.len()))),
        })
        .collect::<PyResult<_>>()?;
    let out = py.detach(|| spans::remap_spans(src_text, tgt_text, &pairs));
    Ok(spans_array(py, &out))
}

/// int64 [m, k]: the perfect source's top-k ids over `ids`, as `perfect_source_topk(ids, k, vocab_size,
/// seed)` draws them (`perfect.rs`).
#[pyfunction]
fn perfect_topk_ids<'py>(py: Python<'py>, ids: PyReadonlyArray1<'py, i64>, k: usize, vocab_size: u64, seed: u64) -> PyResult<Bound<'py, PyArray2<i64>>> {
    if !(1..=1u64 << 32).contains(&vocab_size) {
        return Err(PyValueError::new_err(format!("vocab_size must lie in 1..=2**32, got {vocab_size}")));
    }
    let ids: Vec<u32> = ids
        .as_array()
        .iter()
        .map(|&v| u32::try_from(v).map_err(|_| PyValueError::new_err(format!("token id {v} is negative or too large"))))
        .collect::<PyResult<_>>()?;
    let m = ids.len();
    let out = py.detach(|| perfect::perfect_topk_ids(&ids, k, vocab_size, seed));
    Ok(Array2::from_shape_vec((m, k), out).expect("shape").into_pyarray(py))
}
