//! Which spec changes a running query's checkpoint can take. The engine
//! refuses a checkpoint written with other sources or another number of state
//! partitions (`engine/src/checkpoint.rs`); the operator refuses the same
//! changes up front, with a condition, instead of rolling pods that would
//! fail.

use sluice_crds::StreamingQuerySpec;

/// Why changing `applied` (the spec the engine pods run) into `wanted` would
/// break the checkpoint, or `None` when the change is safe. A change of
/// `checkpoint.location` starts afresh and is always safe.
pub fn refused(applied: &StreamingQuerySpec, wanted: &StreamingQuerySpec) -> Option<String> {
    let location = match (&applied.checkpoint, &wanted.checkpoint) {
        (Some(a), Some(w)) if a.location == w.location => &w.location,
        _ => return None,
    };
    let afresh = "or set a new spec.checkpoint.location to start the query afresh";
    if applied.state_partitions() != wanted.state_partitions() {
        return Some(format!(
            "spec.statePartitions: the checkpoint at {location} splits state into {} partitions and cannot be read with {}; set it back to {}, {afresh}",
            applied.state_partitions(),
            wanted.state_partitions(),
            applied.state_partitions(),
        ));
    }
    let names = |spec: &StreamingQuerySpec| -> Vec<String> {
        spec.sources.iter().map(|s| s.name.clone()).collect()
    };
    if names(applied) != names(wanted) {
        return Some(format!(
            "spec.sources: the checkpoint at {location} holds offsets of the sources {:?} and cannot resume {:?}; keep the sources and their order, {afresh}",
            names(applied),
            names(wanted),
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(extra: &str) -> StreamingQuerySpec {
        let text = format!(
            r#"
apiVersion: sluice.dev/v1alpha1
kind: StreamingQuery
metadata: {{name: q}}
spec:
  sources: [{{name: a, generator: {{kind: rate, rowsPerSecond: 10}}}}]
  query: SELECT * FROM a
  sink: {{console: {{}}}}
{extra}"#
        );
        sluice_crds::load(&text, "test").unwrap().spec
    }

    #[test]
    fn state_partitions_cannot_change_under_the_same_checkpoint() {
        let before = spec("  checkpoint: {location: s3://b/q}\n");
        let after = spec("  checkpoint: {location: s3://b/q}\n  statePartitions: 32\n");
        assert_eq!(
            refused(&before, &after).unwrap(),
            "spec.statePartitions: the checkpoint at s3://b/q splits state into 16 partitions and cannot be read with 32; set it back to 16, or set a new spec.checkpoint.location to start the query afresh"
        );
    }

    #[test]
    fn renaming_a_source_is_refused() {
        let before = spec("  checkpoint: {location: /c}\n");
        let after = StreamingQuerySpec {
            query: "SELECT * FROM b".into(),
            sources: vec![sluice_crds::Source {
                name: "b".into(),
                ..before.sources[0].clone()
            }],
            ..before.clone()
        };
        assert!(refused(&before, &after).unwrap().starts_with(
            "spec.sources: the checkpoint at /c holds offsets of the sources [\"a\"]"
        ));
    }

    #[test]
    fn safe_changes_pass() {
        let before = spec("  checkpoint: {location: /c}\n");
        // A new SQL text, more replicas: the checkpoint takes them.
        let after = StreamingQuerySpec {
            query: "SELECT value FROM a".into(),
            replicas: Some(3),
            ..before.clone()
        };
        assert_eq!(refused(&before, &after), None);
        // A new checkpoint location starts afresh, whatever else changes.
        let moved = spec("  checkpoint: {location: /d}\n  statePartitions: 32\n");
        assert_eq!(refused(&before, &moved), None);
        // Without a checkpoint nothing is kept, so nothing can break.
        assert_eq!(refused(&spec(""), &spec("  statePartitions: 8\n")), None);
    }
}
