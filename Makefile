# rd: every target a user or CI needs. `make run` is the demo, `make test` runs every test.
SHELL := /bin/bash
CARGO ?= cargo
NEXTEST := $(shell $(CARGO) nextest --version >/dev/null 2>&1 && echo yes)

.PHONY: rolling all build server client dummy run test fmt lint guard unit doctest doc bench fuzz soak clean \
	deploy-check image-bins image image-check

all: build

build:
	$(CARGO) build --workspace --bins

server:
	$(CARGO) build --release -p rd-server-bin

client:
	$(CARGO) build --release -p rd-client-bin

dummy:
	$(CARGO) build --release -p rd-dummy-bin

# Builds release binaries, starts rd-dummy, rd-server and rd-client on loopback, fetches a
# file through the tunnel and keeps them running until Ctrl-C.
run: server client dummy
	RD_BIN_DIR=target/release bash tests/demo.sh

fmt:
	$(CARGO) fmt --all

lint:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# rd-proto must stay sans-IO: no runtime, no websocket, no HTTP in its normal dependencies.
guard:
	@if $(CARGO) tree -p rd-proto -e normal --prefix none | grep -Eq '^(tokio|tungstenite|tokio-tungstenite|hyper) '; then \
		echo "rd-proto depends on an IO crate:"; $(CARGO) tree -p rd-proto -e normal; exit 1; \
	else echo "guard: rd-proto is IO-free"; fi

unit:
	$(CARGO) build --workspace --bins
ifeq ($(NEXTEST),yes)
	$(CARGO) nextest run --workspace --no-fail-fast
else
	$(CARGO) test --workspace --no-fail-fast --lib --bins --tests
endif

doctest:
	$(CARGO) test --workspace --doc

# Broken intra-doc links and missing docs fail the build.
doc:
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --no-deps --workspace --lib

test:
	$(CARGO) fmt --all -- --check
	$(MAKE) lint
	$(MAKE) guard
	$(MAKE) unit
	$(MAKE) doctest
	$(MAKE) doc
	$(MAKE) deploy-check
	$(MAKE) image-check

# Criterion micro benchmarks (codec, session state machine), then rd-bench: release builds of
# rd-dummy, rd-server and rd-client on loopback, direct vs ideal TCP relay vs tunnel, idle
# stream/session memory. Prints the table, writes target/bench/report.json and (full scale)
# docs/benchmarks.md. RD_BENCH_SCALE=0.1 for a quick run.
bench:
	$(CARGO) build --release --bins -p rd-server-bin -p rd-client-bin -p rd-dummy-bin -p rd-benches
	$(CARGO) bench -p rd-benches --bench codec --bench session
	target/release/rd-bench --bin-dir target/release

# Soak (issue 7): release builds of rd-dummy, rd-server and rd-client on loopback under a mixed
# workload (small GETs, 1-16 MiB and 64/256 MiB downloads, streamed uploads, every body hashed)
# with a fault every SOAK_FAULT_INTERVAL s (kill rd-client, kill rd-server, a duplicate client).
# Runs SOAK_SECONDS in all, prints the report, writes target/soak/report.json; exits non-zero
# on a hash mismatch, errors outside fault windows or resources not back to their baseline.
SOAK_SECONDS ?= 300
SOAK_FAULT_INTERVAL ?= 30
soak:
	$(CARGO) build --release --bins -p rd-server-bin -p rd-client-bin -p rd-dummy-bin -p rd-benches
	target/release/rd-soak --bin-dir target/release --seconds $(SOAK_SECONDS) --fault-interval $(SOAK_FAULT_INTERVAL)

clean:
	$(CARGO) clean

# Coverage-guided fuzzing of the decoder and the session state machine (not part of CI).
# FUZZ_SECONDS per target; the corpus is seeded from the Go wire vectors.
FUZZ_SECONDS ?= 60
fuzz:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install cargo-fuzz --locked
	python3 tests/fuzz_seeds.py crates/rd-proto/tests/vectors/go-remotedialer-get.json crates/rd-proto/fuzz/corpus
	cd crates/rd-proto/fuzz && for t in decode session; do \
		RUSTC_BOOTSTRAP=1 cargo fuzz run $$t corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; \
	done

# Container image and Kubernetes manifests (docs/deploy/). deploy-check validates the
# manifests offline against the Kubernetes schemas of the oldest version they need (1.30:
# the preStop sleep) and the newest kubernetes-validate knows, then cross-checks them
# (selectors, ports, Secret keys, grace periods, flag names); .ci/run installs the tool.
KUBERNETES_VERSIONS ?= 1.30.0 1.37.0
deploy-check:
	@python3 -m kubernetes_validate --version >/dev/null 2>&1 || { echo "deploy-check: pip install kubernetes-validate"; exit 1; }
	@for v in $(KUBERNETES_VERSIONS); do \
		python3 -m kubernetes_validate --strict --quiet -k $$v $$(find docs/deploy/kubernetes -name '*.yaml' | sort) || exit 1; \
		echo "deploy-check: manifests valid for Kubernetes $$v"; \
	done
	python3 docs/deploy/check_manifests.py --self-test

# Static binaries for the image (glibc, crt-static; the target triple keeps RUSTFLAGS off
# build scripts and proc macros), in target/$(STATIC_TARGET)/release/.
STATIC_TARGET ?= $(shell rustc -vV | sed -n 's/^host: //p')
IMAGE ?= rd:dev
image-bins:
	RUSTFLAGS="-C target-feature=+crt-static" $(CARGO) build --release --locked \
		--target $(STATIC_TARGET) -p rd-server-bin -p rd-client-bin -p rd-dummy-bin

# The image from those binaries (docs/deploy/Dockerfile, target prebuilt), tagged $(IMAGE).
image: image-bins
	rm -rf target/image && mkdir -p target/image
	cp target/$(STATIC_TARGET)/release/rd-server target/$(STATIC_TARGET)/release/rd-client \
		target/$(STATIC_TARGET)/release/rd-dummy target/image/
	docker build -f docs/deploy/Dockerfile --target prebuilt -t $(IMAGE) target/image

# Builds that image and runs it on loopback (docs/deploy/test-image.sh); skips with a
# message when no Docker daemon can be reached or started.
image-check:
	bash docs/deploy/test-image.sh

# Rolling restart (issues 13 and 23's scale check): 5 rd-server replicas on 127.0.0.11-15 found
# through dnsmasq on loopback, behind a round-robin front; 2,000 rd-client library agents given
# only the front's URL (each holds a session with every replica), a tenth holding a long-lived
# idle stream; small requests and hashed 16 MiB downloads through random ready replicas while
# each replica is drained and restarted in turn. Prints the table, writes
# target/rolling/report.json; exits non-zero on a failed request, a cut transfer or a peer hop
# in the steady state.
ROLLING_CLIENTS ?= 2000
rolling:
	$(CARGO) build --release --bins -p rd-server-bin -p rd-client-bin -p rd-dummy-bin -p rd-benches
	target/release/rd-rolling --bin-dir target/release --clients $(ROLLING_CLIENTS)
