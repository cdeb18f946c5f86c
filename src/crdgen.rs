//! `ephemera crdgen`: render the CustomResourceDefinitions as YAML.
//!
//! `crds/` holds the output, one file per CRD (`make crds`); a unit test
//! fails when the committed files differ from what the Rust types generate.

use std::path::Path;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

use crate::{Error, Result};

const HEADER: &str = "# Generated from the Rust types in src/api by `ephemera crdgen` (`make crds`). Do not edit.\n";

/// Writes one `<name>.yaml` per CRD into `output_dir`, or prints them all as
/// one multi-document YAML stream when `output_dir` is `None`.
///
/// # Errors
/// Fails when a CRD cannot be serialised or a file cannot be written.
pub fn run(output_dir: Option<&Path>) -> Result<()> {
    let rendered = render_all()?;
    match output_dir {
        None => {
            let docs: Vec<&str> = rendered.iter().map(|(_, yaml)| yaml.as_str()).collect();
            print!("{}", docs.join("---\n"));
        }
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
            for (file, yaml) in &rendered {
                let path = dir.join(file);
                std::fs::write(&path, yaml).map_err(Error::io(format!("writing {}", path.display())))?;
                eprintln!("wrote {}", path.display());
            }
        }
    }
    Ok(())
}

/// `(file name, YAML)` for every CRD.
///
/// # Errors
/// Fails when a CRD cannot be serialised.
pub fn render_all() -> Result<Vec<(String, String)>> {
    crate::api::crds().iter().map(|crd| Ok((file_name(crd), render(crd)?))).collect()
}

fn file_name(crd: &CustomResourceDefinition) -> String {
    format!("{}.yaml", crd.metadata.name.as_deref().unwrap_or("unnamed"))
}

fn render(crd: &CustomResourceDefinition) -> Result<String> {
    let yaml = serde_yaml::to_string(crd)
        .map_err(|e| Error::Serialization { what: "CustomResourceDefinition", message: e.to_string() })?;
    Ok(format!("{HEADER}{yaml}"))
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn committed_crds_match_the_rust_types() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crds");
        let rendered = render_all().unwrap();
        for (file, yaml) in &rendered {
            let committed = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            assert!(
                committed == *yaml,
                "crds/{file} is out of date with src/api: run `make crds` and commit the result"
            );
        }
        let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
            .map(|entries| entries.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect())
            .unwrap_or_default();
        on_disk.sort();
        let mut expected: Vec<String> = rendered.into_iter().map(|(file, _)| file).collect();
        expected.sort();
        assert_eq!(on_disk, expected, "crds/ holds exactly one file per CRD: run `make crds`");
    }

    #[test]
    fn every_crd_has_the_public_names_of_the_design() {
        let crds = crate::api::crds();
        let names: Vec<_> = crds.iter().map(|c| c.metadata.name.clone().unwrap()).collect();
        assert_eq!(
            names,
            ["identityboundaries.ephemera.dev", "workloadidentities.ephemera.dev", "identityleases.ephemera.dev"]
        );
        for crd in &crds {
            assert_eq!(crd.spec.names.categories.as_deref(), Some(&["ephemera".to_owned()][..]));
            let version = &crd.spec.versions[0];
            assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
            assert!(version.additional_printer_columns.as_ref().is_some_and(|c| c.len() >= 4), "printer columns");
        }
    }
}
