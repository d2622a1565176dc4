//! placeholder
use crate::report::Report;
use crate::stats::Measurement;
use anyhow::Result;
use std::path::Path;
pub fn write(_path: &Path, _r: &Report, _m: &Measurement) -> Result<()> {
    Ok(())
}
