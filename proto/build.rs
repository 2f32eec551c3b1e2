fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/keel.proto");
    tonic_prost_build::configure().compile_protos(&["proto/keel.proto"], &["proto"])?;
    Ok(())
}
