//! # bistro-validate
//!
//! The validator side of BISTRO, built on `bistro-train`:
//!
//! * [`recompute::Scorer`]: recompute `g_v` on a miner's pages at `theta_w` and compare it
//!   with the gradient its slice implies (`R = -||g_m - g_v||`, `e = ||g_m - g_v|| / ||g_v||`),
//!   through `bistro-kernels`' gradient-difference norm;
//! * [`score`]: the reward rule on `e`, per-uid EMAs, softmax weights, u16 quantisation, and
//!   [`score::fold_scores`], the one score -> EMA -> weights path;
//! * [`assignment`]: shared verification's public draw of miners to verifiers;
//! * [`verification`]: shared verification's verdicts counted, disputes to settle, liars found;
//! * [`lead`]: which slices enter a window's accepted set (protocol v2, v5 verdicts);
//! * [`audit`]: a validator's check of another validator's aggregate, before it attests or
//!   disputes it;
//! * [`validator::Validator`]: the window loop that collects, scores, decides or follows the
//!   accepted set, and sets weights.

pub mod assignment;
pub mod audit;
pub mod lead;
pub mod recompute;
pub mod score;
pub mod validator;
pub mod verification;

pub use recompute::Scorer;
pub use score::{ScoreRow, Scoreboard, fold_scores, honesty_score};
pub use validator::{Validator, ValidatorConfig, ValidatorEvent};
