# mha.h - build, test, demo, bench.  `make help` lists the targets.
CC      ?= cc
CFLAGS  ?= -O2
STB_INC := /usr/include/stb
BUILD   := build

# Debian packages each target needs; `make deps` installs the missing ones.
DEPS_TEST  := gcc g++ clang libclang-rt-14-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user libstb-dev libomp-dev
DEPS_DEMO  := gcc libstb-dev
DEPS_BENCH := libopenblas-dev python3-torch python3-numpy
DEPS_GOLD  := python3-torch python3-numpy

.PHONY: all help test demo view bench bench-mha deps deps-demo deps-bench golden clean

all: demo

help:
	@echo "make demo   - build and run the example (writes heatmap PNGs)"
	@echo "make view   - build the .npy viewer; make view NPY=attn.npy VIEWFLAGS='--labels tok.txt' runs it"
	@echo "make test   - every test under scalar, AVX2, clang, ASan+UBSan, NEON (qemu), C++"
	@echo "make bench  - GEMM and attention benchmarks against OpenBLAS and PyTorch"
	@echo "make deps   - install the Debian packages the tests need (root, apt-get)"
	@echo "make golden - regenerate tests/golden/*.bin with PyTorch (python3-torch)"

# Install what is missing; as non-root, print the exact command instead.
define need_pkgs
	@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing:$$missing"; \
	    (apt-get install -y $$missing || (apt-get update && apt-get install -y $$missing)) >/dev/null || exit 1; \
	  else echo "missing Debian packages:$$missing"; echo "run: sudo apt-get install -y$$missing"; exit 1; fi; \
	fi
endef

deps:
	$(call need_pkgs,$(DEPS_TEST))

deps-demo:
	$(call need_pkgs,$(DEPS_DEMO))

deps-bench:
	$(call need_pkgs,$(DEPS_BENCH))

test: deps
	bash tests/run_all.sh

# The heatmap example writes PNGs into $(OUT) and prints their paths.
OUT := out

demo: deps-demo $(BUILD)/demo_print $(BUILD)/attention_heatmaps $(BUILD)/train_reverse
	./$(BUILD)/demo_print
	./$(BUILD)/attention_heatmaps $(OUT)
	./$(BUILD)/train_reverse $(OUT)

$(BUILD)/demo_print: examples/print_forward.c mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -I. $< -o $@ -lm

$(BUILD)/attention_heatmaps: examples/attention_heatmaps.c examples/heatmap.h mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -I. -isystem $(STB_INC) $< -o $@ -lm

# Attention weights saved with numpy.save -> PNGs (docs/visualisation.md).
view: deps-demo $(BUILD)/mha_view
	@if [ -n "$(NPY)" ]; then ./$(BUILD)/mha_view $(NPY) $(VIEWFLAGS); \
	else echo "built $(BUILD)/mha_view; run: $(BUILD)/mha_view WEIGHTS.npy [--labels tokens.txt] [--causal] (--help lists all)"; fi

$(BUILD)/mha_view: examples/mha_view.c examples/npy.h examples/heatmap.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -isystem $(STB_INC) $< -o $@ -lm

# `make bench`: tuned build of bench/bench.c; OpenBLAS is timed side by side
# when <cblas.h> and -lopenblas link (libopenblas-dev), else the bench runs alone.
# `make bench BENCH_ARCH="-mavx2 -mfma"` measures the AVX2 kernels instead of
# what -march=native selects (AVX-512 where the CPU has it).
BENCH_ARCH    ?= -march=native
BENCH_CFLAGS  ?= -std=c99 -O3 $(BENCH_ARCH) -fopenmp
HAVE_OPENBLAS  = $(shell printf '\043include <cblas.h>\nint main(void){openblas_set_num_threads(1);return 0;}\n' | \
                   $(CC) -x c - -o /dev/null -lopenblas 2>/dev/null && echo 1)
BENCH_DEFS     = $(if $(HAVE_OPENBLAS),-DMHA_BENCH_OPENBLAS)
BENCH_LIBS     = $(if $(HAVE_OPENBLAS),-lopenblas) -lm

# (always rebuilt: the flags, not only the sources, decide what it measures)
bench: | $(BUILD)
	$(CC) $(BENCH_CFLAGS) $(BENCH_DEFS) -I. bench/bench.c -o $(BUILD)/bench $(BENCH_LIBS)
	./$(BUILD)/bench

# MHA forward / attention-core tables and the PyTorch comparison
# (bench/bench_mha.c, which runs bench/torch_mha.py); part of `make bench`,
# always rebuilt like bench/bench.c.  OpenMP threads wait passively unless
# OMP_WAIT_POLICY says otherwise (mha.h and PyTorch alike; see docs/performance.md).
# The training table (5) is then run again from an AVX2 build, with its own
# FMA peak, so both kernels' % of peak are measured on this machine.
bench: bench-mha
bench-mha: deps-bench | $(BUILD)
	$(CC) $(BENCH_CFLAGS) -I. bench/bench_mha.c -o $(BUILD)/bench_mha -lm
	$(CC) -std=c99 -O3 -mavx2 -mfma -fopenmp -I. bench/bench_mha.c -o $(BUILD)/bench_mha_avx2 -lm
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(BUILD)/bench_mha
	OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(BUILD)/bench_mha_avx2 --train

$(BUILD)/train_reverse: examples/train_reverse.c examples/heatmap.h mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -I. -Iexamples -isystem $(STB_INC) $< -o $@ -lm

golden:
	$(call need_pkgs,$(DEPS_GOLD))
	/usr/bin/python3 tests/gen_golden.py
	/usr/bin/python3 tests/gen_golden_train.py
	/usr/bin/python3 tests/gen_golden_decode.py

$(BUILD):
	mkdir -p $@

clean:
	rm -rf $(BUILD)
