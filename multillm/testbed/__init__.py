"""Scaffolding that runs the pipeline as real processes, for the tests, the benchmark and two commands.

`processes` starts and stops workers and other child processes; `rabbitmq` drives this
machine's broker (`rabbitmqctl`, scratch vhosts); `cluster` the local three-node cluster;
`otlp` receives OpenTelemetry traces and `prometheus` runs Debian's Prometheus, for the tests
that check what operators see; `chaos` is the soak under faults (`multillm chaos`), and
`multillm demo` starts its workers with `processes`.

None of it is on the runtime path: workers, producers, sinks and providers never import
it, and the CLI imports it only in the modules of the commands that need it, which
`multillm.cli.commands` loads when that command runs (tests/test_layers.py checks both).
"""
