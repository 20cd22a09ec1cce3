//! Every example in `examples/local` is valid and runs here; every one in
//! `examples/invalid` is refused.

use super::repo_root;

fn yaml_files(dir: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join(dir))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {dir}");
    files
}

#[tokio::test]
async fn local_examples_validate_and_plan() {
    for file in yaml_files("examples/local") {
        let query = sluice_crds::load_file(&file).unwrap_or_else(|e| panic!("{e}"));
        if let Err(problems) = sluice_engine::check(&query).await {
            panic!("{}:\n{problems}", file.display());
        }
    }
}

#[tokio::test]
async fn invalid_examples_are_refused() {
    for file in yaml_files("examples/invalid") {
        let refused = match sluice_crds::load_file(&file) {
            Err(_) => true,
            Ok(query) => sluice_engine::check(&query).await.is_err(),
        };
        assert!(refused, "{} was accepted", file.display());
    }
}
