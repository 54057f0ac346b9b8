use std::process::ExitCode;

fn main() -> ExitCode {
    model_relay::cli::main()
}
