//! Device selection from a user string.

use candle_core::Device;

use crate::error::{ModelError, Result};

/// Parse `auto`, `cpu`, `cuda` or `cuda:N`.
///
/// `auto` picks CUDA device 0 when this build has the `cuda` feature and a GPU answers,
/// else the CPU. An explicit `cuda` on a build or machine without one is an error that
/// says why.
pub fn parse_device(spec: &str) -> Result<Device> {
    let s = spec.trim().to_ascii_lowercase();
    match s.as_str() {
        "cpu" => Ok(Device::Cpu),
        "auto" | "" => Ok(cuda_device(0).unwrap_or(Device::Cpu)),
        "cuda" | "gpu" => cuda_device(0).map_err(|reason| ModelError::Device { spec: spec.into(), reason }),
        _ => {
            if let Some(n) = s.strip_prefix("cuda:") {
                let n: usize = n.parse().map_err(|_| ModelError::Device {
                    spec: spec.into(),
                    reason: "expected cuda:N with N a number".into(),
                })?;
                cuda_device(n).map_err(|reason| ModelError::Device { spec: spec.into(), reason })
            } else {
                Err(ModelError::Device { spec: spec.into(), reason: "expected auto, cpu, cuda or cuda:N".into() })
            }
        }
    }
}

fn cuda_device(n: usize) -> std::result::Result<Device, String> {
    if !cfg!(feature = "cuda") {
        return Err("this binary was built without the `cuda` feature (rebuild with --features cuda)".into());
    }
    Device::new_cuda(n).map_err(|e| e.to_string())
}

/// A short human-readable name of a device (`cpu`, `cuda:0`).
pub fn device_name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cpu_and_rejects_garbage() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("cuda:x").is_err());
        assert!(parse_device("tpu").unwrap_err().to_string().contains("expected auto"));
        #[cfg(not(feature = "cuda"))]
        assert!(parse_device("cuda").unwrap_err().to_string().contains("without the `cuda` feature"));
        let _ = parse_device("auto").unwrap();
    }
}
