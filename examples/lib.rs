//! Runnable examples of BISTRO; see the `[[example]]` targets of this package.
