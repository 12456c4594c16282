//! The Python binding: converts arrays and strings, releases the GIL, raises clear errors.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use rayon::prelude::*;

use crate::{dtw, topk, vocab_map};

fn to_chars(tokens: &[String]) -> Vec<Vec<char>> {
    tokens.iter().map(|t| t.chars().collect()).collect()
}

fn path_array<'py>(py: Python<'py>, path: &[(u32, u32)]) -> Bound<'py, PyArray2<i64>> {
    let flat: Vec<i64> = path.iter().flat_map(|&(i, j)| [i64::from(i), i64::from(j)]).collect();
    Array2::from_shape_vec((path.len(), 2), flat).expect("pairs").into_pyarray(py)
}

/// Runs `f` on a rayon pool of `threads` workers (the global pool when None).
fn on_pool<T: Send>(threads: Option<usize>, f: impl FnOnce() -> T + Send) -> PyResult<T> {
    match threads {
        None => Ok(f()),
        Some(0) => Err(PyValueError::new_err("threads must be at least 1")),
        Some(t) => {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .map_err(|e| PyValueError::new_err(format!("cannot start {t} threads: {e}")))?;
            Ok(pool.install(f))
        }
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
#[pyo3(signature = (src_vocab, tgt_vocab, threads=None))]
fn map_vocab<'py>(
    py: Python<'py>,
    src_vocab: Vec<String>,
    tgt_vocab: Vec<String>,
    threads: Option<usize>,
) -> PyResult<(Bound<'py, PyArray1<i64>>, usize)> {
    if tgt_vocab.is_empty() {
        return Err(PyValueError::new_err("target vocabulary is empty: nothing to map onto"));
    }
    let (a, b) = (to_chars(&src_vocab), to_chars(&tgt_vocab));
    let (map, stats) = py.detach(|| on_pool(threads, || vocab_map::map_vocab(&a, &b)))?;
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
    let vmap: Vec<u32> = vocab_map.as_array().iter().map(|&v| to_u32(v, "vocab_map")).collect::<PyResult<_>>()?;
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
    Ok(())
}
