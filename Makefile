# mha.h - build, test, demo, bench.  `make help` lists the targets.
CC      ?= cc
CFLAGS  ?= -O2
STB_INC := /usr/include/stb
BUILD   := build

# Debian packages each target needs; `make deps` installs the missing ones.
DEPS_TEST  := gcc clang gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user libstb-dev libomp-dev
DEPS_DEMO  := gcc libstb-dev
DEPS_BENCH := libopenblas-dev python3-torch python3-numpy
DEPS_GOLD  := python3-torch python3-numpy

.PHONY: all help test demo bench deps deps-demo deps-bench golden clean

all: demo

help:
	@echo "make demo   - build and run the example (writes heatmap PNGs)"
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
	$(CC) -std=c99 $(CFLAGS) -I. -Iexamples -isystem $(STB_INC) $< -o $@ -lm

$(BUILD)/train_reverse: examples/train_reverse.c examples/heatmap.h mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -I. -Iexamples -isystem $(STB_INC) $< -o $@ -lm

golden:
	$(call need_pkgs,$(DEPS_GOLD))
	/usr/bin/python3 tests/gen_golden.py
	/usr/bin/python3 tests/gen_golden_train.py

$(BUILD):
	mkdir -p $@

clean:
	rm -rf $(BUILD)
