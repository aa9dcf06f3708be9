# Source this (bash) before building with `--features cudnn`: fetches the cuDNN frontend's
# header-only C++ API (PyPI nvidia-cudnn-frontend, 11.6 MB) and cuDNN's own headers (from the
# nvidia-cudnn-cu13 wheel that torch 2.11 pins, 9.19.0.56; only include/ is unpacked), once, under
# ~/.cache/cudnn-wheels, and exports CUDNN_FRONTEND_INCLUDE and CUDNN_INCLUDE for build.rs.
# Nothing of cuDNN is linked: the binary dlopens libcudnn.so.9 on the GPU machine (device.sh puts
# torch's copy on LD_LIBRARY_PATH).
_cudnn_dir=${CUDNN_WHEELS:-$HOME/.cache/cudnn-wheels}
_cudnn_py=${PYTHON:-python3}
if [[ ! -f $_cudnn_dir/x/include/cudnn_frontend.h || ! -f $_cudnn_dir/x/nvidia/cudnn/include/cudnn.h ]]; then
  mkdir -p "$_cudnn_dir/x"
  "$_cudnn_py" -m pip download -q --no-deps --only-binary :all: -d "$_cudnn_dir" \
    nvidia-cudnn-frontend==1.32.0 nvidia-cudnn-cu13==9.19.0.56
  (cd "$_cudnn_dir/x" &&
    unzip -q -o "$_cudnn_dir"/nvidia_cudnn_frontend-1.32.0-*.whl 'include/*' &&
    unzip -q -o "$_cudnn_dir"/nvidia_cudnn_cu13-9.19.0.56-*.whl 'nvidia/cudnn/include/*')
fi
export CUDNN_FRONTEND_INCLUDE=$_cudnn_dir/x/include
export CUDNN_INCLUDE=$_cudnn_dir/x/nvidia/cudnn/include
unset _cudnn_dir _cudnn_py
