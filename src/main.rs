//! The `tokenhub` binary: see `tokenhub --help`.

fn main() -> std::process::ExitCode {
    tokenhub::cli::main()
}
