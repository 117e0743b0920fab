mod build_ebpf;

fn main() -> anyhow::Result<()> {
    let command = std::env::args().nth(1);
    match command.as_deref() {
        Some("build-ebpf") => build_ebpf::run(),
        other => anyhow::bail!("unknown command {other:?}; expected one of: build-ebpf"),
    }
}
