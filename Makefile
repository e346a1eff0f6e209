# mha.h - build, test, demo, bench.  `make help` lists the targets.
CC      ?= cc
CFLAGS  ?= -O2
STB_INC := /usr/include/stb
BUILD   := build

# Debian packages each target needs; `make deps` installs the missing ones.
DEPS_TEST  := gcc g++ clang libclang-rt-14-dev gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user libstb-dev libomp-dev cmake pkg-config valgrind fortunes
DEPS_DEMO  := gcc libstb-dev fortunes
DEPS_BENCH := libopenblas-dev python3-torch python3-numpy
DEPS_GOLD  := python3-torch python3-numpy

.PHONY: all help test check demo view bench bench-tiers bench-mha bench-ggml profile-attn deps deps-demo deps-bench golden install uninstall clean train-gpt

all: demo

help:
	@echo "make demo   - build and run the examples (heatmap PNGs, the trained tiny GPT's views and a sample)"
	@echo "make train-gpt - train the tiny GPT from scratch on the fortunes text (5 minutes, 2 threads)"
	@echo "make view   - build the .npy viewer; make view NPY=attn.npy VIEWFLAGS='--labels tok.txt' runs it"
	@echo "make test   - every test under scalar, AVX2, clang, ASan+UBSan, TSan, NEON (qemu), C++; install, valgrind, fuzz"
	@echo "make check  - the edit loop, about 2.5 minutes: every test once (no SIMD flags, the kernels this CPU runs), the core under ASan+UBSan"
	@echo "make bench  - GEMM and attention benchmarks against OpenBLAS and PyTorch; the no-flags build against -march=native;"
	@echo "              GGML=<ggml tree built outside the repo> adds decoding beside ggml (bench/bench_ggml.c)"
	@echo "make install PREFIX=/usr/local [DESTDIR=...] - mha.h, mha/*.h, mha.pc, CMake config (uninstall too)"
	@echo "make deps   - install the Debian packages the tests need (root, apt-get)"
	@echo "make golden - regenerate tests/golden/*.bin and tests/data/safetensors with PyTorch (python3-torch)"

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

# A subset of `make test` for the edit loop (tests/run_all.sh, mode check):
# the same build logic, two compilers at a time.
check: deps
	bash tests/run_all.sh check

# The heatmap example writes PNGs into $(OUT) and prints their paths.
OUT := out

demo: deps-demo $(BUILD)/demo_print $(BUILD)/attention_heatmaps $(BUILD)/train_reverse $(BUILD)/tiny_gpt \
      $(BUILD)/long_attention
	./$(BUILD)/demo_print
	./$(BUILD)/attention_heatmaps $(OUT)
	./$(BUILD)/train_reverse $(OUT)
	OMP_WAIT_POLICY=passive ./$(BUILD)/long_attention $(OUT)
	OMP_WAIT_POLICY=passive ./$(BUILD)/tiny_gpt demo --ckpt $(GPT_CKPT) --out $(OUT)/gpt --len 200

# The tiny GPT (examples/tiny_gpt.c, docs/training.md): `make demo` loads the
# committed checkpoint; `make train-gpt` trains from scratch into $(OUT)/gpt
# (GPT_MINUTES of wall-clock time on GPT_THREADS threads; docs/training.md gives
# the loss this reaches).
GPT_CKPT  := examples/data/tiny_gpt.ckpt
GPT_ARCH  ?= -march=native
GPT_MINUTES ?= 5
GPT_THREADS ?= 2
train-gpt: deps-demo $(BUILD)/tiny_gpt
	OMP_NUM_THREADS=$(GPT_THREADS) OMP_WAIT_POLICY=passive ./$(BUILD)/tiny_gpt train --minutes $(GPT_MINUTES) --out $(OUT)/gpt
	./$(BUILD)/tiny_gpt demo --ckpt $(OUT)/gpt/tiny_gpt_weights.ckpt --out $(OUT)/gpt --len 200

$(BUILD)/tiny_gpt: examples/tiny_gpt.c examples/tiny_gpt.h examples/gpt_ckpt.h examples/tiny_rng.h examples/heatmap.h \
                  examples/attn_inspect.h examples/mha_report.h mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) $(GPT_ARCH) -fopenmp -I. -Iexamples -isystem $(STB_INC) $< -o $@ -lm

# 16384 tokens without the L x L weights (docs/visualisation.md); about 1 s of
# CPU with the machine's SIMD (-march=native), 12 s without, so built like the GPT
$(BUILD)/long_attention: examples/long_attention.c examples/heatmap.h examples/mha_report.h mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) $(GPT_ARCH) -fopenmp -I. -isystem $(STB_INC) $< -o $@ -lm

$(BUILD)/demo_print: examples/print_forward.c mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -I. $< -o $@ -lm

$(BUILD)/attention_heatmaps: examples/attention_heatmaps.c examples/heatmap.h examples/mha_report.h mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -I. -isystem $(STB_INC) $< -o $@ -lm

# Attention weights saved with numpy.save -> PNGs (docs/visualisation.md).
view: deps-demo $(BUILD)/mha_view
	@if [ -n "$(NPY)" ]; then ./$(BUILD)/mha_view $(NPY) $(VIEWFLAGS); \
	else echo "built $(BUILD)/mha_view; run: $(BUILD)/mha_view WEIGHTS.npy [--labels tokens.txt] [--causal] (--help lists all)"; fi

$(BUILD)/mha_view: examples/mha_view.c examples/npy.h examples/heatmap.h examples/mha_report.h mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -I. -isystem $(STB_INC) $< -o $@ -lm

# `make bench`: tuned build of bench/bench.c; OpenBLAS is timed side by side
# when <cblas.h> and -lopenblas link (libopenblas-dev), else the bench runs alone.
# `make bench BENCH_ARCH="-mavx2 -mfma"` measures the AVX2 kernels instead of
# what -march=native selects (AVX-512 where the CPU has it); the GEMM table is
# always run a second time from an AVX2 build, against the AVX2 peak.
BENCH_ARCH    ?= -march=native
# The tables name the kernels of the flags they were built with, so these
# builds pin them (MHA_NO_DISPATCH); bench-tiers measures the run-time choice.
BENCH_CFLAGS  ?= -std=c99 -O3 $(BENCH_ARCH) -DMHA_NO_DISPATCH -fopenmp
HAVE_OPENBLAS  = $(shell printf '\043include <cblas.h>\nint main(void){openblas_set_num_threads(1);return 0;}\n' | \
                   $(CC) -x c - -o /dev/null -lopenblas 2>/dev/null && echo 1)
BENCH_DEFS     = $(if $(HAVE_OPENBLAS),-DMHA_BENCH_OPENBLAS)
# OpenBLAS (and Debian's PyTorch, which calls it) chooses kernels by CPU model,
# and a model newer than its table gets the generic SSE3 ones ("Prescott": a
# Xeon of family 6 model 207 did, at a fifth of its speed).  The references are
# pinned to the kernels of this CPU's ISA unless OPENBLAS_CORETYPE is set:
# SkylakeX for AVX-512, Haswell for AVX2 (the AVX2 runs always use Haswell).
CPU_CORETYPE  := $(shell grep -q ' avx512f ' /proc/cpuinfo 2>/dev/null && echo SkylakeX || \
                   (grep -q ' avx2 ' /proc/cpuinfo 2>/dev/null && echo Haswell))
BENCH_CORE     = $(or $(OPENBLAS_CORETYPE),$(CPU_CORETYPE))
BENCH_ENV      = $(if $(BENCH_CORE),OPENBLAS_CORETYPE=$(BENCH_CORE))
BENCH_ENV_AVX2 = $(if $(CPU_CORETYPE),OPENBLAS_CORETYPE=Haswell)
BENCH_LIBS     = $(if $(HAVE_OPENBLAS),-lopenblas) -lm

# (always rebuilt: the flags, not only the sources, decide what it measures)
bench: | $(BUILD)
	$(CC) $(BENCH_CFLAGS) $(BENCH_DEFS) -I. bench/bench.c -o $(BUILD)/bench $(BENCH_LIBS)
	$(BENCH_ENV) ./$(BUILD)/bench
	$(CC) -std=c99 -O3 -mavx2 -mfma -DMHA_NO_DISPATCH -fopenmp $(BENCH_DEFS) -I. bench/bench.c -o $(BUILD)/bench_avx2 $(BENCH_LIBS)
	$(BENCH_ENV_AVX2) ./$(BUILD)/bench_avx2 gemm

# The kernels a no-flags build runs (chosen at run time, mha.h "the kernel
# tiers") against the build with the flags: bench/bench_tiers.c built with no
# SIMD flags and with -march=native, run A B B A; then the AVX2 tier of the
# no-flags build (capped by the MHA__FORCE_TIER hook) against -mavx2 -mfma.
# Prints each case's ms (mean of the runs' medians) and no-flags / flags.
bench: bench-tiers
bench-tiers: | $(BUILD)
	$(CC) -std=c99 -O3 -I. bench/bench_tiers.c -o $(BUILD)/bench_tiers_plain -lm
	$(CC) -std=c99 -O3 -march=native -DMHA_NO_DISPATCH -I. bench/bench_tiers.c -o $(BUILD)/bench_tiers_native -lm
	$(CC) -std=c99 -O3 -DMHA__FORCE_TIER=1 -I. bench/bench_tiers.c -o $(BUILD)/bench_tiers_plain2 -lm
	$(CC) -std=c99 -O3 -mavx2 -mfma -DMHA_NO_DISPATCH -I. bench/bench_tiers.c -o $(BUILD)/bench_tiers_avx2 -lm
	@cd $(BUILD) && rm -f tiers_*.txt && for b in native plain plain native native plain plain native plain2 avx2 avx2 plain2 plain2 avx2 avx2 plain2; do \
	  ./bench_tiers_$$b >> tiers_$$b.txt || exit 1; done && \
	for pair in "native plain" "avx2 plain2"; do set -- $$pair; \
	  echo; echo "== no SIMD flags ($$(sed -n 's/^kernels //p' tiers_$$2.txt | head -1) kernels, chosen at run time) vs $$1 flags, 1 thread, ms"; \
	  awk -v A=$$1 -v B=$$2 '$$1 == "case" { s[FILENAME, $$2] += $$3; n[FILENAME, $$2]++; if (!seen[$$2]++) order[++k] = $$2 } \
	    END { printf "%-28s %10s %10s %8s\n", "case", A, "no flags", "ratio"; \
	          for (i = 1; i <= k; ++i) { c = order[i]; a = s["tiers_" A ".txt", c] / n["tiers_" A ".txt", c]; \
	            b = s["tiers_" B ".txt", c] / n["tiers_" B ".txt", c]; printf "%-28s %10.3f %10.3f %8.3f\n", c, a, b, b / a; \
	            lg += log(b / a) } printf "%-28s %10s %10s %8.3f\n", "geometric mean", "", "", exp(lg / k) }' \
	    tiers_$$1.txt tiers_$$2.txt; done

# MHA forward / attention-core tables and the PyTorch comparison
# (bench/bench_mha.c, which runs bench/torch_mha.py); part of `make bench`,
# always rebuilt like bench/bench.c.  OpenMP threads wait passively unless
# OMP_WAIT_POLICY says otherwise (mha.h and PyTorch alike; see docs/performance.md).
# The training table (5) is then run again from an AVX2 build, with its own
# FMA peak, so both kernels' % of peak are measured on this machine.
bench: bench-mha
bench-mha: deps-bench | $(BUILD)
	$(CC) $(BENCH_CFLAGS) -I. bench/bench_mha.c -o $(BUILD)/bench_mha -lm
	$(CC) -std=c99 -O3 -mavx2 -mfma -DMHA_NO_DISPATCH -fopenmp -I. bench/bench_mha.c -o $(BUILD)/bench_mha_avx2 -lm
	$(BENCH_ENV) OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(BUILD)/bench_mha
	$(BENCH_ENV_AVX2) OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(BUILD)/bench_mha_avx2 --train

# One decoding step beside ggml's CPU flash attention (bench/bench_ggml.c,
# issue 19): ggml is never fetched or built here.  Give GGML=<its source tree>
# built outside this repository with its release settings (the commands are at
# the top of bench/bench_ggml.c); `make bench` runs it when GGML is given and
# says how otherwise.
GGML ?=
GGML_LIBS = $(GGML)/build/src/libggml.a $(GGML)/build/src/libggml-cpu.a $(GGML)/build/src/libggml-base.a
bench: bench-ggml
bench-ggml: | $(BUILD)
	@if [ -z "$(GGML)" ]; then echo; echo "== ggml side by side: skipped (make bench GGML=<ggml tree built with cmake>; see bench/bench_ggml.c)"; \
	elif [ ! -f $(GGML)/build/src/libggml-cpu.a ]; then echo "bench-ggml: $(GGML)/build/src/libggml-cpu.a not found: build ggml first (bench/bench_ggml.c)"; exit 1; \
	else echo "== ggml $$(git -C $(GGML) rev-parse HEAD 2>/dev/null || echo '(commit unknown)')" && \
	  $(CC) -std=c11 -O3 $(BENCH_ARCH) -DMHA_NO_DISPATCH -fopenmp -I. -I$(GGML)/include bench/bench_ggml.c -o $(BUILD)/bench_ggml \
	    $(GGML_LIBS) -lstdc++ -lm -lpthread && OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-passive} ./$(BUILD)/bench_ggml; fi

# Where the fused attention core's cycles go, phase by phase (bench/profile_attn.c,
# issue 12): the AVX-512 (or -march=native) build, then the AVX2 one.
bench: profile-attn
profile-attn: | $(BUILD)
	$(CC) -std=c99 -O3 $(BENCH_ARCH) -DMHA_NO_DISPATCH -I. bench/profile_attn.c -o $(BUILD)/profile_attn -lm
	$(CC) -std=c99 -O3 -mavx2 -mfma -DMHA_NO_DISPATCH -I. bench/profile_attn.c -o $(BUILD)/profile_attn_avx2 -lm
	./$(BUILD)/profile_attn
	./$(BUILD)/profile_attn_avx2

$(BUILD)/train_reverse: examples/train_reverse.c examples/tiny_rng.h examples/heatmap.h examples/mha_report.h \
                       mha.h | $(BUILD)
	$(CC) -std=c99 $(CFLAGS) -I. -Iexamples -isystem $(STB_INC) $< -o $@ -lm

golden:
	$(call need_pkgs,$(DEPS_GOLD))
	/usr/bin/python3 tests/gen_golden.py
	/usr/bin/python3 tests/gen_golden_train.py
	/usr/bin/python3 tests/gen_golden_decode.py
	/usr/bin/python3 tests/gen_golden_dtype.py
	/usr/bin/python3 tests/gen_safetensors.py

# `make install`: headers under $(PREFIX)/include (mha.h, and the companion
# headers as mha/safetensors.h, mha/npy.h, mha/heatmap.h, mha/attn_inspect.h, with
# mha/mha_report.h, the error helpers they include), pkg-config's mha.pc
# and CMake's mhaConfig.cmake under $(PREFIX)/share.  DESTDIR stages the tree.
# CMakeLists.txt installs the same files (cmake --install).
PREFIX     ?= /usr/local
INCLUDEDIR  = $(DESTDIR)$(PREFIX)/include
DATADIR     = $(DESTDIR)$(PREFIX)/share
COMPANIONS := examples/safetensors.h examples/npy.h examples/heatmap.h examples/attn_inspect.h \
              examples/mha_report.h
MHA_V       = $(shell sed -n 's/^\#define MHA_VERSION_$(1) \([0-9]*\).*/\1/p' mha.h)
SUBST       = sed -e 's/@MHA_VERSION@/$(call MHA_V,MAJOR).$(call MHA_V,MINOR).$(call MHA_V,PATCH)/' \
                  -e 's/@MHA_VERSION_MAJOR@/$(call MHA_V,MAJOR)/' -e 's/@MHA_VERSION_MINOR@/$(call MHA_V,MINOR)/'

install:
	install -d $(INCLUDEDIR)/mha $(DATADIR)/pkgconfig $(DATADIR)/cmake/mha
	install -m 644 mha.h $(INCLUDEDIR)/mha.h
	install -m 644 $(COMPANIONS) $(INCLUDEDIR)/mha/
	$(SUBST) cmake/mha.pc.in > $(DATADIR)/pkgconfig/mha.pc
	$(SUBST) cmake/mhaConfigVersion.cmake.in > $(DATADIR)/cmake/mha/mhaConfigVersion.cmake
	install -m 644 cmake/mhaConfig.cmake $(DATADIR)/cmake/mha/

uninstall:
	rm -f $(INCLUDEDIR)/mha.h $(addprefix $(INCLUDEDIR)/mha/,$(notdir $(COMPANIONS))) \
	      $(DATADIR)/pkgconfig/mha.pc $(DATADIR)/cmake/mha/mhaConfig.cmake $(DATADIR)/cmake/mha/mhaConfigVersion.cmake
	-rmdir $(INCLUDEDIR)/mha $(DATADIR)/cmake/mha 2>/dev/null

$(BUILD):
	mkdir -p $@

clean:
	rm -rf $(BUILD)
