//! Routed inference as a library: router packages and paths as users name them ([`routing`]),
//! batched generation along fixed or routed paths ([`generate`]), validation runs with paired
//! intervals and plots ([`eval`], [`plot`]), merged and pooled across split runs ([`merge`], [`pool`]) and throughput benchmarks ([`bench`]). The
//! `drllm-infer` binary parses flags and prints; a server calls the same functions.
pub mod bench;
pub mod eval;
pub mod generate;
pub mod merge;
pub mod plot;
pub mod pool;
pub mod routing;
