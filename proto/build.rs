// protox compiles the .proto files in pure Rust, so no system `protoc` is needed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "phalanx/v1/control.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["."])?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
