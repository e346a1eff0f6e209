#!/usr/bin/env bash
# Builds every tests/test_*.c under each configuration and runs it; adds up the
# "N passed, N failed" lines and closes with the total.  Used by `make test`
# (every configuration) and `make check` (the edit loop, about 2.5 minutes).
#
#   tests/run_all.sh [config ...]      default: all configurations, in two lanes at once
#   tests/run_all.sh check             every test once (no SIMD flags: the kernels this CPU runs), and
#                                      the core tests under ASan+UBSan
#   TESTS="test_x test_y" tests/run_all.sh scalar neon    only those programs
#   MHA_JOBS=2 tests/run_all.sh avx2   compile two programs at a time (check: 2)
#
# Configurations: scalar (gcc, MHA_NO_SIMD), avx2 (gcc, AVX2+FMA, OpenMP),
# avx512 (gcc, AVX-512F, OpenMP; skipped on CPUs without it), dispatch
# (gcc with no SIMD flags, as a user builds: every test once per kernel tier
# the CPU has, the tier capped through tests/tier_env.h), clang (clang,
# AVX2+FMA, and its no-flags dispatch build on the numeric tests), sanitize (clang ASan+UBSan, AVX2 and scalar),
# tsan (clang ThreadSanitizer, no OpenMP: the programs that run one plan
# from several pthreads), neon (aarch64 cross-compiler, run under
# qemu-aarch64), cxx (C++ compile of the header + the two-translation-unit
# link test), fuzz (bounded libFuzzer runs of the five tests/fuzz_*.c
# harnesses), install (make install + consumer builds with pkg-config and
# CMake), valgrind (memcheck of every example and of
# tests/memcheck_fwd_bwd.c).  A sanitizer report in any program's output
# fails it, whatever its counts say.
set -u
cd "$(dirname "$0")/.."
OUT=build/tests
mkdir -p "$OUT"
WARN="-Wall -Wextra -Wpedantic -Werror"
STB="-isystem /usr/include/stb"
total_pass=0
total_fail=0

note() { printf '%s\n' "$*"; }
fail_one() { note "FAIL $*"; total_fail=$((total_fail + 1)); }

# run_prog CONFIG BINARY [runner...]: run, echo its lines, add its counts
run_prog() {
    local cfg=$1 bin=$2; shift 2
    local log="$bin.log"
    "$@" "$bin" >"$log" 2>&1
    local rc=$?
    grep -E '^(FAIL|NOTE|worst)' "$log" | head -40
    # a sanitizer's report fails the program even where it recovers and exits 0
    if grep -qE 'WARNING: ThreadSanitizer|ERROR: AddressSanitizer|ERROR: LeakSanitizer|runtime error:' "$log"; then
        fail_one "[$cfg] $(basename "$bin"): sanitizer report:"
        grep -E 'WARNING: ThreadSanitizer|ERROR: |SUMMARY: |runtime error:' "$log" | head -10
    fi
    local line
    line=$(grep -E '[0-9]+ passed, [0-9]+ failed' "$log" | tail -1)
    if [ -z "$line" ]; then
        fail_one "[$cfg] $(basename "$bin"): no result line (exit $rc); last lines:"
        tail -5 "$log"
        return
    fi
    local p f
    p=$(sed -E 's/.* ([0-9]+) passed.*/\1/' <<<"$line")
    f=$(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
    if [ "$rc" -ne 0 ] && [ "$f" -eq 0 ]; then fail_one "[$cfg] $(basename "$bin") exited $rc"; fi
    note "[$cfg] $line"
}

# Compiling the header is most of a test's time, so the compiles run
# $MHA_JOBS at a time (default 1), in one pool that build_set calls share;
# the programs then run one after the other, in order (run_set).
pool_running=0
declare -A set_names
pool_slot() {
    while [ "$pool_running" -ge "${MHA_JOBS:-1}" ]; do wait -n; pool_running=$((pool_running - 1)); done
}
pool_drain() { wait; pool_running=0; }

# build_set CONFIG CC "FLAGS" "LIBS": start compiling every tests/test_*.c
# (or the programs named in $SRCS; $TESTS narrows either) into $OUT/CONFIG
build_set() {
    local cfg=$1 cc=$2 flags=$3 libs=$4 src name list=""
    mkdir -p "$OUT/$cfg"
    for src in ${SRCS:-tests/test_*.c}; do
        [ -f "$src" ] || src="tests/$src.c"
        name=$(basename "$src" .c)
        # TESTS="test_a test_b" limits a run to those programs (while developing)
        if [ -n "${TESTS:-}" ] && ! grep -qw -- "$name" <<<"$TESTS"; then continue; fi
        list="$list $name"
        rm -f "$OUT/$cfg/$name" "$OUT/$cfg/$name.built"
        pool_slot
        ( $cc $flags $STB -Itests -I. "$src" -o "$OUT/$cfg/$name" $libs 2>"$OUT/$cfg/$name.build.log" &&
          touch "$OUT/$cfg/$name.built" ) &
        pool_running=$((pool_running + 1))
    done
    set_names[$cfg]=$list
}
# run_set CONFIG [runner...]: after pool_drain, run what build_set built
# (reported as $LABEL when set)
run_set() {
    local cfg=$1 name; shift
    for name in ${set_names[$cfg]}; do
        if [ ! -f "$OUT/$cfg/$name.built" ]; then
            fail_one "[$cfg] $name: build failed:"
            head -20 "$OUT/$cfg/$name.build.log"
            continue
        fi
        run_prog "${LABEL:-$cfg}" "$OUT/$cfg/$name" "$@"
    done
}
# build_and_run CONFIG CC "FLAGS" "LIBS" [runner...]
build_and_run() {
    local cfg=$1
    build_set "$1" "$2" "$3" "$4"
    shift 4
    pool_drain
    run_set "$cfg" "$@"
}

# fuzz_one NAME RUNS "EXTRA_CFLAGS" [libFuzzer args / seed dirs...]: build
# tests/fuzz_NAME.c with libFuzzer + ASan + UBSan, run RUNS inputs from seed 1
fuzz_one() {
    local name=$1 runs=$2 extra=$3 dir="$OUT/fuzz"; shift 3
    mkdir -p "$dir/corpus_$name"
    if clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all $extra $WARN -I. \
         "tests/fuzz_$name.c" -o "$dir/fuzz_$name" -lm 2>"$dir/build_$name.log"; then
        if OMP_NUM_THREADS=3 OMP_WAIT_POLICY=passive "$dir/fuzz_$name" -seed=1 -runs="$runs" "$dir/corpus_$name" "$@" \
             >"$dir/run_$name.log" 2>&1; then
            total_pass=$((total_pass + 1))
            note "[fuzz] fuzz_$name: $(grep -E '^Done' "$dir/run_$name.log"): 1 passed, 0 failed"
        else fail_one "[fuzz] fuzz_$name: crash or sanitizer report:"; grep -E 'ERROR|SUMMARY|crash-|fuzz_' "$dir/run_$name.log" | head; fi
    else fail_one "[fuzz] fuzz_$name: build failed:"; head -20 "$dir/build_$name.log"; fi
}

# pass/fail one step of the install configuration, with its log on failure
install_step() {
    local what=$1 log=$2; shift 2
    if "$@" >"$log" 2>&1; then total_pass=$((total_pass + 1))
    else fail_one "[install] $what:"; tail -15 "$log"; fi
}
test_install() {
    local dir="$OUT/install" how
    local abs; abs="$(pwd)/$dir"
    local model="tests/data/safetensors/encoder.safetensors"
    local cflags="-Wall -Wextra -Wpedantic -Werror"
    rm -rf "$dir" && mkdir -p "$dir"
    install_step "make install PREFIX=..." "$dir/make_install.log" make -s install PREFIX="$abs/prefix"
    export PKG_CONFIG_PATH="$abs/prefix/share/pkgconfig"
    install_step "pkg-config --exact-version (mha.h's version)" "$dir/pc.log" pkg-config --exact-version="$(sed -n 's/^#define MHA_VERSION_MAJOR //p' mha.h).$(sed -n 's/^#define MHA_VERSION_MINOR //p' mha.h).$(sed -n 's/^#define MHA_VERSION_PATCH //p' mha.h)" mha
    # shellcheck disable=SC2046
    if gcc -std=c99 $cflags $(pkg-config --cflags mha) tests/consumer/consumer.c -o "$dir/consumer_pc" \
         $(pkg-config --libs mha) 2>"$dir/consumer_pc.log" &&
       g++ -std=c++11 $cflags $(pkg-config --cflags mha) tests/consumer/consumer_cxx.cpp -o "$dir/consumer_pc_cxx" \
         $(pkg-config --libs mha) 2>>"$dir/consumer_pc.log"; then
        run_prog pkg-config "$dir/consumer_pc" env "MHA_MODEL=$model" && run_prog pkg-config-c++ "$dir/consumer_pc_cxx"
    else fail_one "[install] consumer with pkg-config --cflags does not build:"; head -20 "$dir/consumer_pc.log"; fi
    unset PKG_CONFIG_PATH
    for how in find_package subdirectory fetchcontent; do
        if cmake -S tests/consumer -B "$dir/cmake_$how" -DMHA_HOW="$how" -DMHA_SOURCE_DIR="$(pwd)" \
             -DCMAKE_PREFIX_PATH="$abs/prefix" -DCMAKE_C_FLAGS="$cflags" -DCMAKE_CXX_FLAGS="$cflags" \
             >"$dir/cmake_$how.log" 2>&1 && cmake --build "$dir/cmake_$how" >>"$dir/cmake_$how.log" 2>&1; then
            run_prog "cmake-$how" "$dir/cmake_$how/consumer" env "MHA_MODEL=$model"
            run_prog "cmake-$how-c++" "$dir/cmake_$how/consumer_cxx"
        else fail_one "[install] consumer with CMake ($how) does not build:"; tail -20 "$dir/cmake_$how.log"; fi
    done
    install_step "cmake --install lays out what make install does" "$dir/cmake_self.log" \
        sh -c "cmake -S . -B '$dir/self' && cmake --install '$dir/self' --prefix '$abs/prefix2' && diff -r '$abs/prefix' '$abs/prefix2'"
    install_step "DESTDIR staging and uninstall" "$dir/destdir.log" sh -c \
        "make -s install DESTDIR='$abs/stage' PREFIX=/usr && test -f '$abs/stage/usr/include/mha/safetensors.h' &&
         test -f '$abs/stage/usr/include/mha/mha_report.h' &&
         test -f '$abs/stage/usr/share/cmake/mha/mhaConfigVersion.cmake' &&
         make -s uninstall DESTDIR='$abs/stage' PREFIX=/usr && test -z \"\$(find '$abs/stage' -type f)\""
    note "[install] make install, pkg-config, CMake find_package/add_subdirectory/FetchContent, DESTDIR"
}

# vg_run NAME MAXRC BINARY ARGS...: memcheck one program, which must exit with
# at most MAXRC (1 for train_reverse: cut to two steps it misses its accuracy
# goal) and without a valgrind report
vg_run() {
    local name=$1 maxrc=$2 log="$OUT/valgrind/$1.vg.log"; shift 2
    valgrind -q --error-exitcode=99 --leak-check=full --show-leak-kinds=all --errors-for-leak-kinds=all \
        "$@" >"$log" 2>&1
    local rc=$?
    if [ $rc -ne 99 ] && [ $rc -le "$maxrc" ] && ! grep -q '^==[0-9]*==' "$log"; then
        total_pass=$((total_pass + 1)); note "[valgrind] $name: clean"
    else fail_one "[valgrind] $name (exit $rc):"; grep '^==' "$log" | head -20; fi
}
test_valgrind() {
    local dir="$OUT/valgrind" ex arch=""
    have_avx2 && arch="-mavx2 -mfma"
    rm -rf "$dir" && mkdir -p "$dir"
    for ex in examples/*.c tests/memcheck_fwd_bwd.c; do
        if ! gcc -std=c99 -O1 -g $arch $WARN -I. -Iexamples -Itests $STB "$ex" -o "$dir/$(basename "$ex" .c)" -lm \
               2>"$dir/build.log"; then
            fail_one "[valgrind] $ex: build failed:"; head -10 "$dir/build.log"
        fi
    done
    vg_run print_forward 0 "$dir/print_forward"
    vg_run attention_heatmaps 0 "$dir/attention_heatmaps" "$dir"
    vg_run train_reverse 1 "$dir/train_reverse" "$dir" 2
    vg_run mha_view 0 "$dir/mha_view" tests/data/npy/torch_causal_f4.npy --labels tests/data/npy/tokens5.txt -o "$dir/view"
    vg_run mha_view_bad_file 1 "$dir/mha_view" tests/data/npy/bad_fortran.npy -o "$dir/view"
    vg_run decode 0 "$dir/decode" 8 3
    vg_run decode_f16 0 "$dir/decode" 8 3 f16
    vg_run decoding_masks 0 "$dir/decoding_masks" "$dir"
    vg_run long_attention 0 "$dir/long_attention" "$dir" 192
    vg_run memcheck_fwd_bwd 0 "$dir/memcheck_fwd_bwd"
    [ "$(ls "$dir"/*.png 2>/dev/null | wc -l)" -ge 6 ] || fail_one "[valgrind] the examples wrote fewer PNGs than expected"
}

have_avx2() { grep -q ' avx2 ' /proc/cpuinfo && grep -q ' fma ' /proc/cpuinfo; }

# The configurations named after a kernel tier pin it (MHA_NO_DISPATCH):
# without, an -mavx2 build on an AVX-512 CPU would run the AVX-512 kernels.
PIN="-DMHA_NO_DISPATCH"
# The dispatch configuration builds as a user with no flags does, and caps
# the tier at run time (tests/tier_env.h) to run each one the CPU has.
TIER_ENV="-include tests/tier_env.h -DMHA__FORCE_TIER=mha_test_tier()"
# clang compiles the tiers through its target attribute, not GCC's pragma:
# the numeric tests of every kernel region, at the CPU's best tier
DISPATCH_CLANG_TESTS="test_tiers test_golden test_core test_backward test_fused_backward test_decode test_threads test_train_golden"
cpu_tiers() { echo 0; have_avx2 && echo 1; grep -q ' avx512f ' /proc/cpuinfo && echo 2; }

SAN="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
# The programs that run one plan from several pthreads; the tsan
# configuration builds them without OpenMP (whose runtime TSan cannot see
# into), so every thread is one of theirs.
TSAN_TESTS="test_concurrency test_plans"
# The core of `make check`'s ASan+UBSan build.  Compiling is most of a
# test's time (about 10 s of CPU each under ASan, 5.3 s with -O2 and every
# kernel tier), so the no-flags build of all 45 programs and these 8 come to
# about 2.5 minutes on 2 cores: every refusal and its cleanup, allocation failures included (api,
# errors), the defects' regressions (defects), forward against float64
# (core), backward and the saved forward (backward, saved), plans and their
# runs at every length (plans), and the KV cache with its rings (decode).
# make test runs every program under ASan+UBSan, twice.
CHECK_SAN_TESTS="test_api test_errors test_defects test_core test_backward test_saved test_plans test_decode"

configs=("$@")

# No configuration named: all of them, in two lanes at once (the machines here
# have 2 cores and most tests run on one), each lane's log printed when both
# are done, then the sum of their totals.
if [ ${#configs[@]} -eq 0 ]; then
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}   # a spinning OpenMP thread stalls the other lane
    bash "$0" scalar avx2 avx512 clang tsan cxx install valgrind >"$OUT/lane1.log" 2>&1 &
    lane1=$!
    bash "$0" sanitize neon fuzz dispatch >"$OUT/lane2.log" 2>&1
    wait "$lane1"
    for lane in lane1 lane2; do
        grep -v '^total: ' "$OUT/$lane.log"
        line=$(grep -E '^total: [0-9]+ passed, [0-9]+ failed' "$OUT/$lane.log" | tail -1)
        if [ -z "$line" ]; then fail_one "$lane: no total line"; continue; fi
        total_pass=$((total_pass + $(sed -E 's/total: ([0-9]+) passed.*/\1/' <<<"$line")))
        total_fail=$((total_fail + $(sed -E 's/.* ([0-9]+) failed.*/\1/' <<<"$line")))
    done
    echo "total: $total_pass passed, $total_fail failed"
    [ "$total_fail" -eq 0 ]
    exit
fi

for cfg in "${configs[@]}"; do
    case $cfg in
    scalar)
        build_and_run scalar gcc "-std=c99 -O2 -DMHA_NO_SIMD $WARN" "-lm" ;;
    avx2)
        if have_avx2; then
            OMP_NUM_THREADS=2 build_and_run avx2 gcc "-std=c99 -O2 -mavx2 -mfma $PIN -fopenmp $WARN" "-lm"
        else note "NOTE avx2: this CPU has no AVX2+FMA; configuration skipped"; fi ;;
    avx512)
        if grep -q ' avx512f ' /proc/cpuinfo; then
            OMP_NUM_THREADS=2 build_and_run avx512 gcc "-std=c99 -O2 -mavx512f -mavx2 -mfma -fopenmp $WARN" "-lm"
        else note "NOTE avx512: this CPU has no AVX-512F; configuration skipped"; fi ;;
    clang)
        if have_avx2; then
            build_and_run clang clang "-std=c99 -O2 -mavx2 -mfma $PIN $WARN" "-lm"
        else build_and_run clang clang "-std=c99 -O2 $WARN" "-lm"; fi
        # clang's dispatch (its target attribute, not GCC's pragma), at the CPU's best tier
        OMP_NUM_THREADS=2 SRCS=$DISPATCH_CLANG_TESTS build_and_run clang-dispatch clang "-std=c99 -O2 -fopenmp $WARN" "-lm" ;;
    dispatch)
        # as a user builds: no SIMD flags; each test runs once per tier this CPU has
        build_set dispatch gcc "-std=c99 -O2 -fopenmp $TIER_ENV $WARN" "-lm"
        pool_drain
        for tier in $(cpu_tiers); do
            LABEL=dispatch-tier$tier OMP_NUM_THREADS=2 run_set dispatch env MHA_TEST_TIER=$tier
        done ;;
    check)
        # the edit loop: every test once in the build most users run, then
        # the core tests under ASan+UBSan; two compilers at a time
        export MHA_JOBS=${MHA_JOBS:-2} OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-passive}
        export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1
        # (one pool of compiles for both builds, the slow ASan ones first)
        if have_avx2; then
            SRCS=$CHECK_SAN_TESTS build_set asan-avx2 clang "-std=c99 $SAN -mavx2 -mfma $PIN -fopenmp $WARN" "-lm"
            build_set dispatch gcc "-std=c99 -O2 -fopenmp $WARN" "-lm"
            pool_drain
            OMP_NUM_THREADS=2 run_set dispatch
            OMP_NUM_THREADS=2 run_set asan-avx2
        else
            SRCS=$CHECK_SAN_TESTS build_set asan-scalar clang "-std=c99 $SAN -DMHA_NO_SIMD $WARN" "-lm"
            build_set scalar gcc "-std=c99 -O2 -DMHA_NO_SIMD $WARN" "-lm"
            pool_drain
            run_set scalar
            run_set asan-scalar
        fi ;;
    tsan)
        # one plan from several pthreads at once, each with its own mha_run:
        # any race inside mha.h is a ThreadSanitizer report, which fails
        if command -v clang >/dev/null; then
            TSAN_OPTIONS=halt_on_error=0:exitcode=66 SRCS=$TSAN_TESTS build_and_run tsan clang \
                "-std=c99 -O1 -g -fsanitize=thread -pthread $WARN" "-lm"
        else fail_one "tsan: clang missing (make deps installs it)"; fi ;;
    sanitize)
        export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1
        build_and_run asan-scalar clang "-std=c99 $SAN -DMHA_NO_SIMD $WARN" "-lm"
        # with OpenMP: a thread count the workspace was not sized for shows up here
        have_avx2 && OMP_NUM_THREADS=2 build_and_run asan-avx2 clang "-std=c99 $SAN -mavx2 -mfma $PIN -fopenmp $WARN" "-lm" ;;
    neon)
        if command -v aarch64-linux-gnu-gcc >/dev/null && command -v qemu-aarch64 >/dev/null; then
            build_and_run neon aarch64-linux-gnu-gcc "-std=c99 -O2 -static $WARN" "-lm" qemu-aarch64
        else fail_one "neon: aarch64-linux-gnu-gcc or qemu-aarch64 missing (make deps installs them)"; fi ;;
    cxx)
        mkdir -p "$OUT/cxx"
        for cxx in g++ clang++; do
            if $cxx -x c++ -std=c++11 $WARN -c tests/cxx_compile.cpp -I. -o "$OUT/cxx/cxx_$cxx.o" 2>"$OUT/cxx/$cxx.log"; then
                $cxx -std=c++11 "$OUT/cxx/cxx_$cxx.o" -o "$OUT/cxx/cxx_$cxx" && run_prog "cxx-$cxx" "$OUT/cxx/cxx_$cxx"
            else fail_one "[cxx] $cxx could not compile mha.h as C++:"; head -20 "$OUT/cxx/$cxx.log"; fi
            # the AVX-512 layer as C++: -march=native (on this CPU) and -mavx512f (anywhere),
            # at -O2 and -O3 (GCC's -Wmaybe-uninitialized looks deeper at -O3)
            for olev in -O2 -O3; do
                for arch in -march=native -mavx512f; do
                    if $cxx -x c++ -std=c++11 $WARN $olev $arch -c tests/cxx_compile.cpp -I. \
                         -o "$OUT/cxx/cxx_$cxx$arch.o" 2>"$OUT/cxx/$cxx$arch.log"; then
                        total_pass=$((total_pass + 1)); note "[cxx] $cxx $olev $arch: 1 passed, 0 failed"
                    else fail_one "[cxx] $cxx $olev $arch does not compile mha.h warning-free:"; head -20 "$OUT/cxx/$cxx$arch.log"; fi
                done
            done
        done
        # the header as C at -O3 with every SIMD layer, as a drop-in user builds it
        for arch in -march=native "-mavx2 -mfma -fopenmp" -DMHA_NO_SIMD; do
            if gcc -std=c99 $WARN -O3 $arch -I. -c tests/link_a.c -o "$OUT/cxx/o3.o" 2>"$OUT/cxx/o3.log"; then
                total_pass=$((total_pass + 1)); note "[c] gcc -O3 $arch: 1 passed, 0 failed"
            else fail_one "[c] gcc -O3 $arch does not compile mha.h warning-free:"; head -20 "$OUT/cxx/o3.log"; fi
        done
        if gcc -std=c99 $WARN -O1 -I. tests/link_a.c tests/link_b.c -o "$OUT/cxx/link" -lm 2>"$OUT/cxx/link.log"; then
            run_prog link "$OUT/cxx/link"
        else fail_one "[link] two translation units do not link:"; head -20 "$OUT/cxx/link.log"; fi
        if gcc -std=c99 $WARN -O1 -I. -DMHA_STATIC tests/link_a.c tests/link_b.c -o "$OUT/cxx/link_static" -lm 2>"$OUT/cxx/link_static.log"; then
            run_prog link-static "$OUT/cxx/link_static"
        else fail_one "[link-static] MHA_STATIC build does not link:"; head -20 "$OUT/cxx/link_static.log"; fi
        # the examples must build warning-free with both compilers (make demo runs them)
        for cc in gcc clang; do
            for ex in examples/*.c; do
                if $cc -std=c99 $WARN -O1 -I. $STB -fsyntax-only "$ex" 2>"$OUT/cxx/example.log"; then
                    total_pass=$((total_pass + 1))
                else fail_one "[examples] $cc: $ex does not build warning-free:"; head -10 "$OUT/cxx/example.log"; fi
            done
        done
        note "[examples] examples/*.c build with gcc and clang, $WARN"
        # the benchmarks are not run here, only kept compiling (without OpenBLAS)
        for bn in bench bench_mha bench_tiers profile_attn callgrind_backward; do
            if gcc -std=c99 $WARN -O1 -fopenmp $(have_avx2 && echo -mavx2 -mfma) -I. "bench/$bn.c" \
                   -o "$OUT/cxx/$bn" -lm 2>"$OUT/cxx/$bn.log"; then
                total_pass=$((total_pass + 1))
            else fail_one "[bench] bench/$bn.c does not compile:"; head -20 "$OUT/cxx/$bn.log"; fi
        done
        note "[bench] bench/*.c compile, $WARN" ;;
    fuzz)
        # bounded libFuzzer runs (docs/robustness.md has the long ones):
        # fuzz_forward (random sizes, masks, NaN/Inf), fuzz_diff (fused vs
        # unfused vs a float64 reference), and the two file readers seeded
        # with the test files
        fuzz_one forward "${MHA_FUZZ_RUNS:-60000}" "" -max_len=4096
        fuzz_one diff "${MHA_FUZZ_DIFF_RUNS:-6000}" "-fopenmp $(have_avx2 && echo -mavx2 -mfma)" -max_len=4096 tests/data/fuzz/diff
        fuzz_one npy 100000 "" -max_len=4096 -dict=tests/fuzz_npy.dict tests/data/npy
        fuzz_one safetensors 100000 "" -max_len=8192 -dict=tests/fuzz_safetensors.dict tests/data/safetensors
        fuzz_one ckpt 100000 "" -max_len=4096 tests/data/ckpt ;;
    install)
        # `make install` into a temporary prefix, then tests/consumer built
        # against it with pkg-config and with CMake (find_package), and from
        # the source tree (add_subdirectory, FetchContent); cmake --install
        # must lay out the same files; DESTDIR stages and uninstall removes.
        if command -v cmake >/dev/null && command -v pkg-config >/dev/null; then
            test_install
        else fail_one "install: cmake or pkg-config missing (make deps installs them)"; fi ;;
    valgrind)
        # memcheck: no error and no leak of any kind (definite, indirect,
        # possible, still reachable) in every example, run small, and in a
        # forward + backward program.  Built without OpenMP (its thread pool
        # stays allocated at exit) and without AVX-512 (valgrind lacks it).
        if command -v valgrind >/dev/null; then test_valgrind
        else note "NOTE valgrind: not installed (make deps installs it); configuration skipped"; fi ;;
    *) fail_one "unknown configuration $cfg" ;;
    esac
done
echo "total: $total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
