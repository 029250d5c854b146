//! The fuzz targets in `fuzz/`, run from the test suite.
//!
//! For every target in `fuzz/src/lib.rs` ([`checks::TARGETS`]), in order:
//!
//! 1. the committed corpus, `fuzz/corpus/<target>/`, is replayed here, on the
//!    stable toolchain, through the very check the fuzz target runs (this file
//!    includes the fuzz crate's checks as a module), so every corpus file is a
//!    regression test that needs no nightly;
//! 2. the target is fuzzed for a bounded time with
//!    `cargo +nightly fuzz run <target> <scratch corpus> fuzz/corpus/<target>`,
//!    starting from the committed corpus. New inputs go to the scratch
//!    directory under `fuzz/target/`, so a run never changes the repository; a
//!    crash fails the test with the path of the crashing input (under
//!    `fuzz/artifacts/<target>/`) and the commands to reproduce it.
//!
//! Step 2 needs the nightly toolchain and cargo-fuzz. Without nightly (which
//! cannot be installed from the package registries) the test says so and
//! skips step 2. With nightly but no cargo-fuzz it skips too, unless
//! `CI=true`, where it fails: `.ci/run` installs cargo-fuzz.
//! `SPOOLD_FUZZ_SECS` sets the seconds per target (default 8; 0 skips step 2).
//!
//! The build is `--dev --sanitizer none`: the build, not the fuzzing, is most
//! of the time this test takes, and a dev build takes about half as long as
//! cargo-fuzz's default optimized one. It keeps debug assertions and overflow
//! checks on (an overflow is a crash), and the checked code is safe Rust, for
//! which AddressSanitizer would add run time and no findings. For long runs
//! by hand, use cargo-fuzz's defaults: `cd fuzz && cargo +nightly fuzz run <target>`.

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

const BUILD_FLAGS: &[&str] = &["--dev", "--sanitizer", "none"];

#[test]
fn fuzz_targets_hold_their_properties() {
    let fuzz_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let fuzzer = Fuzzer::find(&fuzz_dir);
    for &(name, check) in checks::TARGETS {
        let corpus = fuzz_dir.join("corpus").join(name);
        let n = replay(&corpus, check);
        eprintln!("fuzz {name}: replayed {n} corpus files on stable");
        if let Some(f) = &fuzzer {
            f.run(name, &corpus);
        }
    }
}

/// Runs every file of the corpus through the check; panics naming the file.
fn replay(corpus: &Path, check: checks::Check) -> usize {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus)
        .unwrap_or_else(|e| panic!("{}: {e}", corpus.display()))
        .map(|e| e.expect("a corpus entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{} is empty", corpus.display());
    for file in &files {
        let data = std::fs::read(file).expect("a corpus file");
        if catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            panic!(
                "corpus file {} fails its check (see the panic above)",
                file.display()
            );
        }
    }
    files.len()
}

struct Fuzzer {
    dir: PathBuf,
    secs: u64,
}

impl Fuzzer {
    /// The nightly cargo-fuzz setup, built once; None (with the reason said)
    /// when fuzzing is off or impossible here.
    fn find(dir: &Path) -> Option<Fuzzer> {
        let secs = match std::env::var("SPOOLD_FUZZ_SECS") {
            Ok(s) => s.parse().expect("SPOOLD_FUZZ_SECS is a number of seconds"),
            Err(_) => 8,
        };
        if secs == 0 {
            eprintln!("fuzz: SPOOLD_FUZZ_SECS=0, only the corpus is replayed");
            return None;
        }
        let f = Fuzzer {
            dir: dir.to_owned(),
            secs,
        };
        // A nightly toolchain cannot be installed where only the package
        // registries are reachable, so its absence is a skip, said aloud,
        // even in CI. With nightly present, CI (whose .ci/run installs
        // cargo-fuzz) must fuzz.
        if !f.cargo(&["--version"]).status.success() {
            eprintln!("fuzz: SKIPPED the fuzz run, only the corpus is replayed: no nightly toolchain here (rustup toolchain install nightly --profile minimal)");
            return None;
        }
        if !f.cargo(&["fuzz", "--version"]).status.success() {
            let why = "cargo-fuzz is missing (cargo install cargo-fuzz --locked)";
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true and nightly is here, but fuzzing cannot run: {why}"
            );
            eprintln!("fuzz: skipped, only the corpus is replayed: {why}");
            return None;
        }
        let start = Instant::now();
        let out = f.cargo(&[&["fuzz", "build"], BUILD_FLAGS].concat());
        assert!(
            out.status.success(),
            "cargo fuzz build failed:\n{}",
            tail(&out)
        );
        eprintln!("fuzz: built the targets in {:.0?}", start.elapsed());
        Some(f)
    }

    /// `cargo +nightly <args>` in `fuzz/`, with the environment of this test
    /// run (stable's cargo and rustc) taken out.
    fn cargo(&self, args: &[&str]) -> Output {
        Command::new("cargo")
            .arg("+nightly")
            .args(args)
            .current_dir(&self.dir)
            .env_remove("CARGO")
            .env_remove("RUSTC")
            .env_remove("RUSTDOC")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR")
            .output()
            .expect("cargo can be started")
    }

    /// Fuzzes one target for `secs` seconds from its corpus.
    fn run(&self, name: &str, corpus: &Path) {
        let scratch = self.dir.join("target").join("scratch-corpus").join(name);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).expect("a scratch corpus directory");
        let time = format!("-max_total_time={}", self.secs);
        let (scratch, corpus) = (scratch.to_str().unwrap(), corpus.to_str().unwrap());
        let run = ["fuzz", "run", name, scratch, corpus];
        let libfuzzer = ["--", &time, "-timeout=10", "-print_final_stats=1"];
        let out = self.cargo(&[&run[..], BUILD_FLAGS, &libfuzzer].concat());
        let log = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            let input = log
                .lines()
                .find_map(|l| l.split_once("Test unit written to ").map(|(_, p)| p.trim()))
                .unwrap_or("(no input was written; see the output)");
            panic!(
                "fuzz target {name} failed on the input {input}\nreproduce: cd fuzz && cargo +nightly fuzz run {flags} {name} {input}\nor on stable: copy it into fuzz/corpus/{name}/ and run cargo test --test fuzz\n{}",
                tail(&out),
                flags = BUILD_FLAGS.join(" "),
            );
        }
        let runs = log
            .lines()
            .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
            .map_or("?", str::trim);
        eprintln!("fuzz {name}: {runs} runs in {} s, no failure", self.secs);
    }
}

/// The end of a command's output, for a failure message.
fn tail(out: &Output) -> String {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}
