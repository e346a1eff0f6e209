#!/usr/bin/env bash
# Builds every tests/test_*.c under each configuration and runs it; adds up the
# "N passed, N failed" lines and closes with the total.  Used by `make test`.
#
#   tests/run_all.sh [config ...]      default: all configurations
#
# Configurations: scalar (gcc, MHA_NO_SIMD), avx2 (gcc, AVX2+FMA, OpenMP),
# avx512 (gcc, AVX-512F, OpenMP; skipped on CPUs without it),
# clang (clang, AVX2+FMA), sanitize (clang ASan+UBSan, AVX2 and scalar),
# neon (aarch64 cross-compiler, run under qemu-aarch64), cxx (C++ compile of the
# header + the two-translation-unit link test), fuzz (bounded libFuzzer run).
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

# build_and_run CONFIG CC "FLAGS" "LIBS" [runner...]
build_and_run() {
    local cfg=$1 cc=$2 flags=$3 libs=$4; shift 4
    mkdir -p "$OUT/$cfg"
    local src name
    for src in tests/test_*.c; do
        name=$(basename "$src" .c)
        if ! $cc $flags $STB -Itests -I. "$src" -o "$OUT/$cfg/$name" $libs 2>"$OUT/$cfg/$name.build.log"; then
            fail_one "[$cfg] $name: build failed:"
            head -20 "$OUT/$cfg/$name.build.log"
            continue
        fi
        run_prog "$cfg" "$OUT/$cfg/$name" "$@"
    done
}

have_avx2() { grep -q ' avx2 ' /proc/cpuinfo && grep -q ' fma ' /proc/cpuinfo; }

configs=("$@")
[ ${#configs[@]} -eq 0 ] && configs=(scalar avx2 avx512 clang sanitize neon cxx fuzz)

for cfg in "${configs[@]}"; do
    case $cfg in
    scalar)
        build_and_run scalar gcc "-std=c99 -O2 -DMHA_NO_SIMD $WARN" "-lm" ;;
    avx2)
        if have_avx2; then
            OMP_NUM_THREADS=2 build_and_run avx2 gcc "-std=c99 -O2 -mavx2 -mfma -fopenmp $WARN" "-lm"
        else note "NOTE avx2: this CPU has no AVX2+FMA; configuration skipped"; fi ;;
    avx512)
        if grep -q ' avx512f ' /proc/cpuinfo; then
            OMP_NUM_THREADS=2 build_and_run avx512 gcc "-std=c99 -O2 -mavx512f -mavx2 -mfma -fopenmp $WARN" "-lm"
        else note "NOTE avx512: this CPU has no AVX-512F; configuration skipped"; fi ;;
    clang)
        if have_avx2; then
            build_and_run clang clang "-std=c99 -O2 -mavx2 -mfma $WARN" "-lm"
        else build_and_run clang clang "-std=c99 -O2 $WARN" "-lm"; fi ;;
    sanitize)
        SAN="-O1 -g -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=all"
        export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1
        build_and_run asan-scalar clang "-std=c99 $SAN -DMHA_NO_SIMD $WARN" "-lm"
        have_avx2 && build_and_run asan-avx2 clang "-std=c99 $SAN -mavx2 -mfma $WARN" "-lm" ;;
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
            # the AVX-512 layer as C++: -march=native (on this CPU) and -mavx512f (anywhere)
            for arch in -march=native -mavx512f; do
                if $cxx -x c++ -std=c++11 $WARN -O2 $arch -c tests/cxx_compile.cpp -I. \
                     -o "$OUT/cxx/cxx_$cxx$arch.o" 2>"$OUT/cxx/$cxx$arch.log"; then
                    total_pass=$((total_pass + 1)); note "[cxx] $cxx -O2 $arch: 1 passed, 0 failed"
                else fail_one "[cxx] $cxx -O2 $arch does not compile mha.h warning-free:"; head -20 "$OUT/cxx/$cxx$arch.log"; fi
            done
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
        # the benchmark is not run here, only kept compiling (without OpenBLAS)
        if gcc -std=c99 $WARN -O1 -fopenmp -I. bench/bench.c -o "$OUT/cxx/bench" -lm 2>"$OUT/cxx/bench.log"; then
            note "[bench] bench/bench.c compiles"
        else fail_one "[bench] bench/bench.c does not compile:"; head -20 "$OUT/cxx/bench.log"; fi ;;
    fuzz)
        # bounded libFuzzer run of tests/fuzz_forward.c (random sizes, masks, NaN/Inf)
        mkdir -p "$OUT/fuzz/corpus"
        if clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all $WARN -I. \
             tests/fuzz_forward.c -o "$OUT/fuzz/fuzz_forward" -lm 2>"$OUT/fuzz/build.log"; then
            if "$OUT/fuzz/fuzz_forward" -seed=1 -runs="${MHA_FUZZ_RUNS:-60000}" -max_len=4096 \
                 "$OUT/fuzz/corpus" >"$OUT/fuzz/run.log" 2>&1; then
                total_pass=$((total_pass + 1)); note "[fuzz] $(grep -E '^Done' "$OUT/fuzz/run.log"): 1 passed, 0 failed"
            else fail_one "[fuzz] crash or sanitizer report:"; grep -E 'ERROR|SUMMARY|crash-' "$OUT/fuzz/run.log" | head; fi
        else fail_one "[fuzz] build failed:"; head -20 "$OUT/fuzz/build.log"; fi ;;
    *) fail_one "unknown configuration $cfg" ;;
    esac
done
echo "total: $total_pass passed, $total_fail failed"
[ "$total_fail" -eq 0 ]
