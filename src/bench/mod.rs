//! `herald bench`: a load generator for Herald clusters.

use clap::Args;
use std::process::ExitCode;

#[derive(Args, Debug)]
pub struct BenchArgs {}

pub async fn run(_args: BenchArgs) -> ExitCode {
    eprintln!("herald bench: not built yet");
    ExitCode::from(2)
}
