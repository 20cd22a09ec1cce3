//! Prints the autoscaler's decisions on each simulated trace as a Markdown
//! table: `cargo run --example autoscaler_traces` (`bench/autoscaler.sh`).

use sluice_operator::autoscaler::simulation::{run, traces};

fn main() {
    for trace in traces() {
        let steps = run(&trace, 15);
        println!("### {}\n", trace.name);
        println!("| t (s) | input/s | lag | replicas | decision |");
        println!("| ---: | ---: | ---: | ---: | --- |");
        let mut last = None;
        for (i, step) in steps.iter().enumerate() {
            // Every minute, and every step where the replicas change.
            let changes = step.decision.replicas != step.replicas;
            if step.t % 120 == 0 || changes || last != Some(step.replicas) || i + 1 == steps.len() {
                println!(
                    "| {} | {:.0} | {:.0} | {} | {}{} |",
                    step.t,
                    step.input_rate,
                    step.lag,
                    step.replicas,
                    if changes {
                        format!("**→ {}**: ", step.decision.replicas)
                    } else {
                        String::new()
                    },
                    step.decision.reason
                );
            }
            last = Some(step.replicas);
        }
        let max_lag = steps.iter().map(|s| s.lag).fold(0.0, f64::max);
        let changes = steps
            .windows(2)
            .filter(|w| w[0].replicas != w[1].replicas)
            .count();
        println!(
            "\n{}: {} s in steps of 15 s, {} changes, peak lag {:.0} records, final {} replicas\n",
            trace.name,
            trace.seconds,
            changes,
            max_lag,
            steps.last().map_or(0, |s| s.replicas)
        );
    }
}
