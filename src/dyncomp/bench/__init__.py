"""Speed and memory benchmarks (`dyncomp bench`) and the reference-style decoder they compare against."""
