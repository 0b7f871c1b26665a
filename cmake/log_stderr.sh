#!/usr/bin/env bash
# CMake compiler launcher: runs the compile command, copying its stderr (nvcc's -Xptxas -v report)
# into the log file given as the first argument.
set -o pipefail
log="$1"
shift
{ "$@" 2>&1 1>&3 3>&- | tee -a "$log"; } 3>&1 1>&2
