use clap::Parser;

fn main() {
    let cli = devproxy::cli::Cli::parse();
    std::process::exit(devproxy::cli::main(cli));
}
