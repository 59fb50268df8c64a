# The draftray image every node of cluster.yaml / deploy/gcp.yaml / deploy/kuberay-rayjob.yaml runs.
#
#   docker build -t draftray:latest .
#   (docs/cluster.md: tag and push to ECR / Artifact Registry)
#
# Base: Ray's own image at exactly the Ray version we pin (ray==2.60.0 in constraints.txt), Python
# 3.11, CUDA 12 user-space libraries. The cluster's Ray must equal the image's Ray and the
# laptop's, so the tag moves only with constraints.txt. (ray-ml images stopped at 2.49.)
FROM rayproject/ray:2.60.0-py311-cu12x

# torch on the GPU image. constraints.txt pins torch==2.13.0 and torchvision==0.28.0, resolved on
# our CPU build machines to the CPU wheels (+cpu, from the PyTorch CPU index). Here we want the
# CUDA builds of the very same versions, from the PyTorch index of one CUDA release. Installing
# them first, from that index alone, settles it: the project install below finds
# torch 2.13.0+cuXXX already there, which satisfies `torch==2.13.0` (a local version label such as
# +cu128 matches a pin without one), so pip neither replaces it nor pulls another build.
# The wheel carries its own CUDA runtime (nvidia-* wheels); the host only needs a driver new
# enough for TORCH_CUDA. Pick a tag the index publishes for 2.13.0 (https://pytorch.org/get-started/).
ARG TORCH_CUDA=cu128
RUN pip install --no-cache-dir \
        --index-url https://download.pytorch.org/whl/${TORCH_CUDA} \
        torch==2.13.0 torchvision==0.28.0 \
    && python -c "import torch, sys; v = torch.__version__; print('torch', v); sys.exit(0 if v.startswith('2.13.0+cu') else 'not a CUDA build of torch 2.13.0: ' + v)"

# Created by the image's `ray` user (WORKDIR alone would make it root-owned and pip could not
# build in it).
RUN mkdir -p /home/ray/draftray
WORKDIR /home/ray/draftray

# Dependencies first, in their own layer: they change far less often than the code.
# The constraints pin everything to the tested set; `ray` stays the image's 2.60.0.
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users _draftray_compat.py ./
COPY --chown=ray:users models ./models
COPY --chown=ray:users rewards ./rewards
COPY --chown=ray:users rayjobs ./rayjobs
RUN pip install --no-cache-dir -c constraints.txt . \
    && python -c "import torch, ray; assert torch.__version__.startswith('2.13.0+cu'), torch.__version__; assert ray.__version__ == '2.60.0', ray.__version__" \
    && draftray --help > /dev/null

# Presets and docs: `draftray train configs/...` works from the image's working directory too
# (a submitted job brings its own working directory; see docs/cluster.md).
COPY --chown=ray:users configs ./configs
COPY --chown=ray:users docs ./docs

# Hugging Face cache on the node's disk, shared by all Train workers of a node, so the SD weights and
# the reward models are fetched once per node (`draftray weights fetch ...`), not once per worker.
ENV HF_HOME=/home/ray/.cache/huggingface
