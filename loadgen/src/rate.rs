//! placeholder
use crate::cli::*;
use crate::run::{ClientMode, WorkerPlan};
use crate::stats::{Measurement, Progress};
use anyhow::Result;
use std::time::Duration;
impl ClientMode for RateArgs {
    fn name(&self) -> &'static str {
        "rate"
    }
    fn client(&self) -> &ClientArgs {
        &self.client
    }
    fn conns(&self) -> u64 {
        self.concurrency
    }
    fn validate(&self) -> Result<()> {
        Ok(())
    }
    fn run_worker(&self, _plan: &WorkerPlan, _progress: &Progress) -> Result<Measurement> {
        let _ = Duration::ZERO;
        anyhow::bail!("todo")
    }
}
