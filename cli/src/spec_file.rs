//! Job spec files: YAML, or a Flink SQL script (`.sql`) compiled into the same spec.

use std::path::Path;

use anyhow::Context;
use keel_spec::JobSpec;

/// A checked spec and the YAML text the cluster is sent.
pub struct SpecFile {
    pub spec: JobSpec,
    pub yaml: String,
}

/// Reads and checks a spec file. A `.sql` file is compiled (its job is named after the file
/// unless it sets `pipeline.name`); anything else is read as YAML. Errors name the file.
pub fn read(file: &Path) -> anyhow::Result<SpecFile> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read job spec {}", file.display()))?;
    let context = || format!("job spec {}", file.display());
    if keel_sql::is_sql_file(file) {
        let stem = file.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let compiled = keel_sql::compile(&text, &stem).with_context(context)?;
        Ok(SpecFile { spec: compiled.spec, yaml: compiled.yaml })
    } else {
        let spec = JobSpec::parse(&text).with_context(context)?;
        Ok(SpecFile { spec, yaml: text })
    }
}

/// `keel explain FILE` (and `keel run --dry-run`): checks the spec with no cluster and prints
/// its plan, or with `yaml` the YAML spec the cluster would be sent.
pub fn explain(file: &Path, yaml: bool) -> anyhow::Result<()> {
    let spec = read(file)?;
    if yaml {
        print!("{}", spec.yaml);
    } else {
        print!("{}", spec.spec.explain());
    }
    Ok(())
}
