//! CUDA launches of the fused ops' kernels (`cuda_src.cu`), compiled once per process by
//! NVRTC for the project's one PTX baseline, `bistro_kernels::ptx::PTX_ARCH` (`compute_80`:
//! runs on A100, H100 and newer through the driver's JIT).

use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::cudarc::nvrtc::{CompileOptions, compile_ptx_with_opts};
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Result, Shape, bail};
use half::bf16;

/// The kernels' source.
pub const SOURCE: &str = include_str!("cuda_src.cu");
const MODULE: &str = "bistro_fused";
const BLOCK: u32 = 256;

/// The kernels as PTX (compiled on first use).
pub fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let r = PTX.get_or_init(|| {
        compile_ptx_with_opts(
            SOURCE,
            CompileOptions {
                arch: Some(bistro_kernels::ptx::PTX_ARCH),
                use_fast_math: Some(false),
                ..Default::default()
            },
        )
        .map(|p| p.to_src())
        .map_err(|e| format!("NVRTC could not compile the fused kernels: {e}"))
    });
    r.as_deref().map_err(|e| candle_core::Error::Msg(e.clone()))
}

/// An input buffer viewed from its layout's offset.
enum In<'a> {
    F32(CudaView<'a, f32>),
    Bf16(CudaView<'a, bf16>),
    U32(CudaView<'a, u32>),
}

fn input<'a>(s: &'a CudaStorage, l: &Layout) -> Result<In<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("fused op: input must be contiguous") };
    Ok(match s.dtype() {
        DType::F32 => In::F32(s.as_cuda_slice::<f32>()?.slice(a..b)),
        DType::BF16 => In::Bf16(s.as_cuda_slice::<bf16>()?.slice(a..b)),
        DType::U32 => In::U32(s.as_cuda_slice::<u32>()?.slice(a..b)),
        d => bail!("fused op: no CUDA kernel for {d:?}"),
    })
}

/// An output buffer of the same dtype as the (float) input.
enum Out {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<bf16>),
}

impl Out {
    fn alloc(dev: &CudaDevice, dtype: DType, n: usize) -> Result<Self> {
        // SAFETY: every kernel below writes every element of its output.
        Ok(match dtype {
            DType::F32 => Out::F32(unsafe { dev.alloc::<f32>(n)? }),
            DType::BF16 => Out::Bf16(unsafe { dev.alloc::<bf16>(n)? }),
            d => bail!("fused op: no CUDA kernel for {d:?}"),
        })
    }

    fn storage(self, dev: &CudaDevice) -> CudaStorage {
        match self {
            Out::F32(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
            Out::Bf16(s) => CudaStorage::wrap_cuda_slice(s, dev.clone()),
        }
    }
}

fn push_in<'a>(b: &mut LaunchArgs<'a>, x: &'a In<'a>) {
    match x {
        In::F32(v) => b.arg(v),
        In::Bf16(v) => b.arg(v),
        In::U32(v) => b.arg(v),
    };
}

fn push_out<'a>(b: &mut LaunchArgs<'a>, x: &'a mut Out) {
    match x {
        Out::F32(v) => b.arg(v),
        Out::Bf16(v) => b.arg(v),
    };
}

fn suffix(d: DType) -> Result<&'static str> {
    match d {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        d => bail!("fused op: no CUDA kernel for {d:?}"),
    }
}

/// The PTX as the loaded driver accepts it: NVRTC's `.version` lowered when the NVRTC on
/// the library path is newer than the driver (see `bistro_kernels::ptx`).
fn ptx_for_driver() -> Result<&'static str> {
    static PTX: OnceLock<String> = OnceLock::new();
    if let Some(p) = PTX.get() {
        return Ok(p);
    }
    let src = ptx()?;
    let fitted = match bistro_kernels::ptx::driver_version() {
        Some(v) => bistro_kernels::ptx::ptx_for_driver(src, v).into_owned(),
        None => src.to_string(),
    };
    Ok(PTX.get_or_init(|| fitted))
}

/// Loads kernel `$name` of the module (Candle does not export the function type).
macro_rules! func {
    ($dev:expr, $name:expr) => {
        $dev.get_or_load_custom_func(&$name, MODULE, ptx_for_driver()?)?
    };
}

fn rows_cfg(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn elems_cfg(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(BLOCK as usize).clamp(1, 65_535) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 }
}

fn int(x: usize, what: &str) -> Result<i32> {
    i32::try_from(x)
        .map_err(|_| candle_core::Error::Msg(format!("fused op: {what} {x} is too large for the CUDA kernels")))
}

/// RMSNorm forward.
pub(crate) fn rms_norm_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    d: usize,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device();
    let (x, w) = (input(s1, l1)?, input(s2, l2)?);
    let n = l1.shape().elem_count();
    let mut y = Out::alloc(dev, s1.dtype(), n)?;
    let f = func!(dev, format!("rms_fwd_{}", suffix(s1.dtype())?));
    let (di, epsf) = (int(d, "row length")?, eps as f32);
    let mut b = f.builder();
    push_in(&mut b, &x);
    push_in(&mut b, &w);
    push_out(&mut b, &mut y);
    b.arg(&di);
    b.arg(&epsf);
    // SAFETY: the kernel reads n + d and writes n elements, all allocated above.
    unsafe { b.launch(rows_cfg(n / d)) }.w()?;
    Ok((y.storage(dev), l1.shape().clone()))
}

/// RMSNorm backward: `[N + 1, D]` with `dx` then `dw`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn rms_norm_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    d: usize,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let dev = s1.device();
    let (x, w, dy) = (input(s1, l1)?, input(s2, l2)?, input(s3, l3)?);
    let rows = l1.shape().elem_count() / d;
    let sfx = suffix(s1.dtype())?;
    let mut out = Out::alloc(dev, s1.dtype(), (rows + 1) * d)?;
    // SAFETY: written by the dx kernel for every row.
    let mut rstd = unsafe { dev.alloc::<f32>(rows.max(1))? };
    let (di, ri, epsf) = (int(d, "row length")?, int(rows, "rows")?, eps as f32);
    {
        let f = func!(dev, format!("rms_bwd_dx_{sfx}"));
        let mut b = f.builder();
        push_in(&mut b, &x);
        push_in(&mut b, &w);
        push_in(&mut b, &dy);
        push_out(&mut b, &mut out);
        b.arg(&mut rstd);
        b.arg(&di);
        b.arg(&epsf);
        // SAFETY: rows x d inputs, rows x d + rows outputs, allocated above.
        unsafe { b.launch(rows_cfg(rows)) }.w()?;
    }
    let chunks = rows.div_ceil(256).clamp(1, 64);
    let chunk = rows.div_ceil(chunks).max(1);
    // SAFETY: every (chunk, column) entry is written by the partial kernel.
    let mut partial = unsafe { dev.alloc::<f32>(chunks * d)? };
    let (ci, chi) = (int(chunks, "chunks")?, int(chunk, "chunk")?);
    let cols = (d.div_ceil(BLOCK as usize)) as u32;
    {
        let f = func!(dev, format!("rms_bwd_dw_partial_{sfx}"));
        let mut b = f.builder();
        push_in(&mut b, &x);
        push_in(&mut b, &dy);
        b.arg(&rstd);
        b.arg(&mut partial);
        b.arg(&ri);
        b.arg(&di);
        b.arg(&chi);
        let cfg = LaunchConfig { grid_dim: (cols, chunks as u32, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: reads rows x d, writes chunks x d, allocated above.
        unsafe { b.launch(cfg) }.w()?;
    }
    {
        let f = func!(dev, format!("rms_bwd_dw_final_{sfx}"));
        let mut b = f.builder();
        b.arg(&partial);
        push_out(&mut b, &mut out);
        b.arg(&ri);
        b.arg(&di);
        b.arg(&ci);
        let cfg = LaunchConfig { grid_dim: (cols, 1, 1), block_dim: (BLOCK, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: writes row `rows` of out (d elements), allocated above.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((out.storage(dev), Shape::from((rows + 1, d))))
}

/// Heads between token-major and head-major, rotating when tables are given;
/// `dims = [B, T, H, D]`, `to_tokens` for head-major input.
pub(crate) fn heads(
    s: &CudaStorage,
    l: &Layout,
    tables: Option<(&CudaStorage, &Layout, &CudaStorage, &Layout)>,
    [bn, t, h, d]: [usize; 4],
    to_tokens: bool,
) -> Result<CudaStorage> {
    let dev = s.device();
    let x = input(s, l)?;
    let n = l.shape().elem_count();
    let mut y = Out::alloc(dev, s.dtype(), n)?;
    let f = func!(dev, format!("heads_{}", suffix(s.dtype())?));
    let (cos, sin) = match tables {
        Some((sc, lc, ss, ls)) => {
            if sc.dtype() != DType::F32 || ss.dtype() != DType::F32 {
                bail!("rope: CUDA tables must be f32");
            }
            (Some(input(sc, lc)?), Some(input(ss, ls)?))
        }
        None => (None, None),
    };
    // A null pointer tells the kernel not to rotate.
    let null: u64 = 0;
    let args = [int(bn, "batch")?, int(t, "sequence")?, int(h, "heads")?, int(d, "head size")?, i32::from(to_tokens)];
    let mut b = f.builder();
    push_in(&mut b, &x);
    match (&cos, &sin) {
        (Some(c), Some(s)) => {
            push_in(&mut b, c);
            push_in(&mut b, s);
        }
        _ => {
            b.arg(&null);
            b.arg(&null);
        }
    }
    push_out(&mut b, &mut y);
    for a in &args {
        b.arg(a);
    }
    // SAFETY: reads and writes n elements (and T' x D/2 table entries), allocated above.
    unsafe { b.launch(elems_cfg(n / 2)) }.w()?;
    Ok(y.storage(dev))
}

/// Causal softmax forward.
pub(crate) fn causal_softmax_fwd(s: &CudaStorage, l: &Layout, tq: usize, tk: usize, scale: f64) -> Result<CudaStorage> {
    let dev = s.device();
    let x = input(s, l)?;
    let n = l.shape().elem_count();
    let mut y = Out::alloc(dev, s.dtype(), n)?;
    let f = func!(dev, format!("softmax_fwd_{}", suffix(s.dtype())?));
    let (qi, ki, sc) = (int(tq, "Tq")?, int(tk, "Tk")?, scale as f32);
    let mut b = f.builder();
    push_in(&mut b, &x);
    push_out(&mut b, &mut y);
    b.arg(&qi);
    b.arg(&ki);
    b.arg(&sc);
    // SAFETY: reads and writes n elements, allocated above.
    unsafe { b.launch(rows_cfg(n / tk)) }.w()?;
    Ok(y.storage(dev))
}

/// Causal softmax backward.
pub(crate) fn causal_softmax_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    tq: usize,
    tk: usize,
    scale: f64,
) -> Result<CudaStorage> {
    let dev = s1.device();
    let (p, dp) = (input(s1, l1)?, input(s2, l2)?);
    let n = l1.shape().elem_count();
    let mut y = Out::alloc(dev, s1.dtype(), n)?;
    let f = func!(dev, format!("softmax_bwd_{}", suffix(s1.dtype())?));
    let (qi, ki, sc) = (int(tq, "Tq")?, int(tk, "Tk")?, scale as f32);
    let mut b = f.builder();
    push_in(&mut b, &p);
    push_in(&mut b, &dp);
    push_out(&mut b, &mut y);
    b.arg(&qi);
    b.arg(&ki);
    b.arg(&sc);
    // SAFETY: reads 2n and writes n elements, allocated above.
    unsafe { b.launch(rows_cfg(n / tk)) }.w()?;
    Ok(y.storage(dev))
}

/// SwiGLU forward.
pub(crate) fn swiglu_fwd(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<CudaStorage> {
    let dev = s1.device();
    let (g, u) = (input(s1, l1)?, input(s2, l2)?);
    let n = l1.shape().elem_count();
    let mut y = Out::alloc(dev, s1.dtype(), n)?;
    let f = func!(dev, format!("swiglu_fwd_{}", suffix(s1.dtype())?));
    let nn = n as u64;
    let mut b = f.builder();
    push_in(&mut b, &g);
    push_in(&mut b, &u);
    push_out(&mut b, &mut y);
    b.arg(&nn);
    // SAFETY: reads 2n and writes n elements, allocated above.
    unsafe { b.launch(elems_cfg(n)) }.w()?;
    Ok(y.storage(dev))
}

/// SwiGLU backward: `[2, ..]` with `dg` then `du`.
pub(crate) fn swiglu_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> Result<CudaStorage> {
    let dev = s1.device();
    let (g, u, dy) = (input(s1, l1)?, input(s2, l2)?, input(s3, l3)?);
    let n = l1.shape().elem_count();
    let mut y = Out::alloc(dev, s1.dtype(), 2 * n)?;
    let f = func!(dev, format!("swiglu_bwd_{}", suffix(s1.dtype())?));
    let nn = n as u64;
    let mut b = f.builder();
    push_in(&mut b, &g);
    push_in(&mut b, &u);
    push_in(&mut b, &dy);
    push_out(&mut b, &mut y);
    b.arg(&nn);
    // SAFETY: reads 3n and writes 2n elements, allocated above.
    unsafe { b.launch(elems_cfg(n)) }.w()?;
    Ok(y.storage(dev))
}

/// Cross-entropy forward (f32 logits).
pub(crate) fn cross_entropy_fwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    n: usize,
    v: usize,
) -> Result<CudaStorage> {
    if s1.dtype() != DType::F32 {
        bail!("cross-entropy: CUDA logits must be f32");
    }
    let dev = s1.device();
    let (x, t) = (input(s1, l1)?, input(s2, l2)?);
    let mut y = Out::alloc(dev, DType::F32, n)?;
    let f = func!(dev, "ce_fwd_f32");
    let vi = int(v, "vocabulary")?;
    let mut b = f.builder();
    push_in(&mut b, &x);
    push_in(&mut b, &t);
    push_out(&mut b, &mut y);
    b.arg(&vi);
    // SAFETY: reads n x v + n and writes n elements, allocated above.
    unsafe { b.launch(rows_cfg(n)) }.w()?;
    Ok(y.storage(dev))
}

/// Cross-entropy backward (f32 logits), from `[grad; loss]`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn cross_entropy_bwd(
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
    n: usize,
    v: usize,
) -> Result<(CudaStorage, Shape)> {
    if s1.dtype() != DType::F32 || s3.dtype() != DType::F32 {
        bail!("cross-entropy: CUDA logits must be f32");
    }
    let dev = s1.device();
    let (x, t, gl) = (input(s1, l1)?, input(s2, l2)?, input(s3, l3)?);
    let mut y = Out::alloc(dev, DType::F32, n * v)?;
    let f = func!(dev, "ce_bwd_f32");
    let (ni, vi) = (int(n, "rows")?, int(v, "vocabulary")?);
    let mut b = f.builder();
    push_in(&mut b, &x);
    push_in(&mut b, &t);
    push_in(&mut b, &gl);
    push_out(&mut b, &mut y);
    b.arg(&ni);
    b.arg(&vi);
    // SAFETY: reads n x v + 3n and writes n x v elements, allocated above.
    unsafe { b.launch(rows_cfg(n)) }.w()?;
    Ok((y.storage(dev), Shape::from((n, v))))
}

/// The scalars of one AdamW step (see `crate::optim`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamScalars {
    pub lr: f32,
    pub decay: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub scale_m: f32,
    pub scale_v: f32,
    pub eps: f32,
}

/// One in-place AdamW step of an f32 parameter on the GPU; `mv` holds `m` then `v`.
pub(crate) fn adamw_step(
    theta: &mut CudaStorage,
    lt: &Layout,
    grad: &CudaStorage,
    lg: &Layout,
    mv: &mut CudaSlice<f32>,
    s: AdamScalars,
) -> Result<()> {
    let (Some((a, b)), Some((c, d))) = (lt.contiguous_offsets(), lg.contiguous_offsets()) else {
        bail!("adamw: parameter and gradient must be contiguous")
    };
    let n = b - a;
    if d - c != n || mv.len() != 2 * n {
        bail!("adamw: sizes differ");
    }
    let dev = theta.device().clone();
    let f = func!(dev, "adamw_f32");
    let g = grad.as_cuda_slice::<f32>()?.slice(c..d);
    let mut t = theta.as_cuda_slice_mut::<f32>()?.slice_mut(a..b);
    let nn = n as u64;
    let mut bld = f.builder();
    bld.arg(&mut t);
    bld.arg(&g);
    bld.arg(mv);
    bld.arg(&nn);
    for x in [&s.lr, &s.decay, &s.beta1, &s.beta2, &s.scale_m, &s.scale_v, &s.eps] {
        bld.arg(x);
    }
    // SAFETY: theta, grad (n each) and mv (2n) hold what the kernel indexes.
    unsafe { bld.launch(elems_cfg(n)) }.w()?;
    Ok(())
}
