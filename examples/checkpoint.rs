//! Checkpoint tools: write a genesis checkpoint, and compute the loss and gradients of a
//! checkpoint on some text — to compare with another implementation (Hugging Face
//! `transformers` opens these directories with `LlamaForCausalLM.from_pretrained`).
//!
//! ```bash
//! cargo run --release --example checkpoint -- genesis --model tiny --seed 0 --out ckpt
//! cargo run --release --example checkpoint -- grad --checkpoint ckpt --text "hello hackers" --out grads.safetensors
//! ```
//!
//! A miner's or validator's state directory (`.bistro/miners/<hotkey>`) is such a
//! checkpoint too. `grad` tokenises the text with the embedded tokenizer (or
//! `--tokenizer`), uses the ids as inputs and labels (the model shifts them), and writes
//! one f32 tensor per parameter with Hugging Face names, the gradient of the mean
//! cross-entropy, plus `input_ids` (as f32) and the loss in the metadata.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bistro_model::checkpoint::{load_checkpoint, save_checkpoint_dir, to_safetensors_bytes};
use bistro_model::{Llama, ModelConfig, Params};
use bistro_train::data::TextTokenizer;
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};

/// Write checkpoints and dump gradients for cross-checks.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write the genesis parameters of a model as a checkpoint directory.
    Genesis {
        /// Model preset or config file.
        #[arg(long, default_value = "tiny")]
        model: String,
        /// Genesis seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Loss and gradients of a checkpoint on a text.
    Grad {
        /// Checkpoint directory or .safetensors file.
        #[arg(long)]
        checkpoint: PathBuf,
        /// The text.
        #[arg(long)]
        text: String,
        /// tokenizer.json to use instead of the embedded one.
        #[arg(long, default_value = "embedded")]
        tokenizer: String,
        /// Output safetensors file.
        #[arg(long)]
        out: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Genesis { model, seed, out } => {
            let cfg = ModelConfig::resolve(&model)?;
            let params = Params::genesis(&cfg, seed, &Device::Cpu)?;
            let file = save_checkpoint_dir(&params, &out)?;
            println!("wrote {} ({} parameters)", file.display(), params.num_params());
        }
        Cmd::Grad { checkpoint, text, tokenizer, out } => {
            let params = load_checkpoint(&checkpoint, &Device::Cpu)?;
            let tok = TextTokenizer::open(&tokenizer)?;
            let ids = tok.encode(&text)?;
            anyhow::ensure!(ids.len() >= 2, "the text must have at least two tokens");
            let n = ids.len();
            let input = Tensor::from_vec(ids.clone(), (1, n), &Device::Cpu)?;
            let labels = input.to_dtype(DType::I64)?;
            let model = Llama::new(&params)?;
            let loss = model.loss(&input, &labels)?;
            let value = loss.to_scalar::<f32>()?;
            let grads = params.gradients(&loss.backward()?)?;
            let mut tensors = Vec::new();
            for (s, g) in params.specs().iter().zip(&grads) {
                tensors.push((s.name.clone(), s.shape.clone(), g.flatten_all()?.to_vec1::<f32>()?));
            }
            tensors.push(("input_ids".into(), vec![n], ids.iter().map(|&i| i as f32).collect()));
            let mut meta = BTreeMap::new();
            meta.insert("loss".to_string(), format!("{value}"));
            std::fs::write(&out, to_safetensors_bytes(&tensors, meta)?)?;
            println!("loss {value} over {} targets; gradients written to {}", n - 1, out.display());
        }
    }
    Ok(())
}
