//! Errors of the model crate.

use std::path::PathBuf;

/// Everything that can go wrong when building, loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor operation failed inside Candle.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),

    /// The configuration is inconsistent (for example heads that do not divide the width).
    #[error("invalid model config: {0}")]
    InvalidConfig(String),

    /// No preset of that name exists.
    #[error("unknown model preset `{name}` (known presets: {known})")]
    UnknownPreset {
        /// The name that was asked for.
        name: String,
        /// The names that exist, comma separated.
        known: String,
    },

    /// A config file could not be parsed.
    #[error("cannot parse model config {path}: {reason}")]
    ConfigParse {
        /// The file (or `<string>`).
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },

    /// A checkpoint does not contain a tensor the model needs.
    #[error("checkpoint {path}: missing tensor `{name}`")]
    MissingTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The Hugging Face name of the missing tensor.
        name: String,
    },

    /// A checkpoint contains a tensor the model does not have.
    #[error("checkpoint {path}: unexpected tensor `{name}` (not a parameter of this model config)")]
    UnexpectedTensor {
        /// The checkpoint file.
        path: PathBuf,
        /// The unexpected name.
        name: String,
    },

    /// A checkpoint tensor has the wrong shape.
    #[error("checkpoint {path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        found: Vec<usize>,
    },

    /// A checkpoint tensor has the wrong dtype.
    #[error("checkpoint {path}: tensor `{name}` has dtype {found}, expected F32")]
    DtypeMismatch {
        /// The checkpoint file.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The dtype found in the file.
        found: String,
    },

    /// A checkpoint is not a valid safetensors file.
    #[error("checkpoint {path} is not a valid safetensors file: {reason}")]
    BadCheckpoint {
        /// The checkpoint file.
        path: PathBuf,
        /// What the parser said.
        reason: String,
    },

    /// Reading or writing a file failed.
    #[error("i/o error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A value could not be serialised (for a hash or a file).
    #[error("cannot serialise the {what}: {source}")]
    Serialize {
        /// What was being serialised.
        what: &'static str,
        /// The serialiser's error.
        #[source]
        source: serde_json::Error,
    },

    /// A parameter index or flat index was out of range.
    #[error("index out of range: {0}")]
    OutOfRange(String),

    /// A parameter received no gradient in `backward()`.
    #[error("parameter `{0}` received no gradient (is an op without backward in the graph?)")]
    NoGradient(String),

    /// The requested device is not available in this build or on this machine.
    #[error("device `{spec}` is not available: {reason}")]
    Device {
        /// The device string given by the user.
        spec: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// A batch had no token with a label to predict.
    #[error("the batch has no target tokens (all labels are ignored)")]
    EmptyBatch,
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    /// Whether the model's configuration is wrong (an unknown preset, a config file that
    /// does not parse or holds impossible values), as opposed to a failure at run time.
    pub fn is_config(&self) -> bool {
        matches!(self, ModelError::UnknownPreset { .. } | ModelError::ConfigParse { .. } | ModelError::InvalidConfig(_))
    }
}
