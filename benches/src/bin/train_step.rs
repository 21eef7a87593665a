//! One full training step (forward, backward, AdamW) of a preset, timed per step, for the
//! side-by-side comparison with PyTorch (`scripts/bench-vs-torch.sh`).
//!
//! Prints one JSON line per measured step: `{"impl":"bistro","model":..,"tokens":..,
//! "wall_s":..,"cpu_s":..,"grad_s":..,"opt_s":..}`; the same AdamW settings as
//! `benches/torch_reference.py` (lr 1e-4, betas 0.9/0.95, eps 1e-8, weight decay 0.1). The
//! gradient comes from the model's own backward pass, or from Candle's autograd with
//! `--autograd`.

use bistro_model::optim::AdamW;
use bistro_model::{Llama, ModelConfig, Params};
use candle_core::Device;
use candle_nn::{Optimizer, ParamsAdamW};

#[global_allocator]
static ALLOC: bistro_train::process::MiMalloc = bistro_train::process::MiMalloc;

fn cpu_seconds() -> f64 {
    // utime + stime of this process, in clock ticks (field 14 and 15 of /proc/self/stat).
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 =
        f.get(11).and_then(|x| x.parse().ok()).unwrap_or(0.0) + f.get(12).and_then(|x| x.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { bistro_train::process::tune() };
    let get = bistro_benches::arg;
    let preset = get("--model", "tiny");
    let batch: usize = get("--batch", "8").parse()?;
    let seq: usize = get("--seq", "256").parse()?;
    let steps: usize = get("--steps", "5").parse()?;
    let warmup: usize = get("--warmup", "2").parse()?;
    // `--autograd` measures Candle's autograd instead of the model's own backward pass.
    let autograd = std::env::args().any(|a| a == "--autograd");
    let mut cfg = ModelConfig::preset(&preset)?;
    // `--layers N` keeps the preset's shapes with N layers (to measure memory per layer).
    let layers = get("--layers", "");
    if !layers.is_empty() {
        cfg.num_hidden_layers = layers.parse()?;
    }
    eprintln!("cpu: {}", bistro_benches::cpu_description());
    let dev = Device::Cpu;
    let params = Params::genesis(&cfg, 0, &dev)?;
    let model = Llama::new(&params)?;
    let (ids, labels) = bistro_benches::synthetic_batch(batch, seq, cfg.vocab_size, &dev)?;
    let mut opt = AdamW::new(
        params.vars().to_vec(),
        ParamsAdamW { lr: 1e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 },
    )?;
    let flops = bistro_benches::flops_per_token(&cfg, seq);
    for i in 0..warmup + steps {
        let (t0, c0) = (std::time::Instant::now(), cpu_seconds());
        let grads = if autograd {
            let loss = model.loss(&ids, &labels)?;
            loss.backward()?
        } else {
            let n = (batch * (seq - 1)) as f64;
            model.loss_grads(&ids, &labels, 1.0 / n)?.grads
        };
        let t_grad = t0.elapsed().as_secs_f64();
        opt.step(&grads)?;
        let (wall, cpu) = (t0.elapsed().as_secs_f64(), cpu_seconds() - c0);
        if i >= warmup {
            println!(
                r#"{{"impl":"bistro","model":"{preset}","tokens":{},"wall_s":{wall:.4},"cpu_s":{cpu:.3},"grad_s":{t_grad:.4},"opt_s":{:.4},"flops_per_token":{flops:.0}}}"#,
                batch * seq,
                wall - t_grad
            );
        }
    }
    Ok(())
}
