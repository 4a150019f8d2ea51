//! The `tokenhub` binary: see `tokenhub --help`.

/// mimalloc instead of the C library's allocator: a fetch makes a few
/// dozen small allocations, which cost glibc's malloc about a sixth of the
/// hot path's instructions (README, "Benchmark").
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokenhub::cli::main()
}
