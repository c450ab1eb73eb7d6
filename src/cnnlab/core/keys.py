"""The names that training and evaluation write and that `cnnlab compare` reads, defined once:
MLflow metric keys, tags and artifact paths, and the pipeline's output files."""

# --- MLflow metrics -----------------------------------------------------------------------------------
TEST_LOSS, TEST_ACC = "test/loss", "test/acc"                # trainer.test on the best checkpoint
# The binary task model.positive_classes vs the rest, on the test set, for any head (a softmax
# head: its positive classes' probabilities summed > 0.5); cnnlab.tracking.tasks.
TEST_BINARY_ACC = "test/binary_acc"
VAL_ACC = "val/acc"                                          # per epoch
BEST_VAL_ACC, BEST_VAL_EPOCH = "val/best_acc", "val/best_epoch"
EPOCH_TIME, TRAIN_IMAGES_PER_S = "perf/epoch_time_s", "perf/train_images_per_s"
MEDIAN_EPOCH_TIME = "perf/median_epoch_time_s"
MEDIAN_TRAIN_IMAGES_PER_S = "perf/median_train_images_per_s"  # the run's; perf/train_images_per_s is per epoch
TORCH_THREADS = "perf/torch_threads"                         # per epoch (runtime.num_threads: auto adapts)
PEAK_MEMORY, PEAK_DEVICE_MEMORY = "perf/peak_memory_mb", "perf/peak_device_memory_mb"  # process RSS; CUDA
PARAMS, MACS, SIZE_BYTES = "model/params", "model/macs", "model/size_bytes"
LATENCY = "perf/latency_ms_per_image_b{batch}"
EVAL_MACRO_F1 = "eval/macro_f1"                              # the evaluate stage's own keys
EVAL_PER_CLASS = "eval/{metric}/{name}"                      # metric: precision | recall | f1

# --- MLflow tags ----------------------------------------------------------------------------------------
ROLE, ROLE_TRAIN, ROLE_SWEEP = "cnnlab.role", "train", "sweep"
PARENT_RUN = "mlflow.parentRunId"
ERROR = "error"
MODEL_NAME, DATA_NAME, DATA_CHECKSUM = "model.name", "data.name", "data.checksum"
DATA_SKIPPED = "data.skipped_files"  # how many images data.skip_bad_files left out (listed in SKIPPED_ARTIFACT)
TASK = "cnnlab.task"                                         # what its accuracy measures (cnnlab.tracking.tasks)
DEVICE, PRECISION, THREADS = "device", "precision", "torch.threads"  # what the run used (tags)
CHANNELS_LAST = "channels_last"
ACCELERATOR, NUM_DEVICES = "accelerator", "num_devices"  # cpu | cuda; processes x nodes
FUSED_OPTIMIZER, CUDNN_BENCHMARK, TF32 = "optimizer_fused", "cudnn_benchmark", "tf32"
LATENCY_PRECISION = "latency_precision"  # the precision the model profile timed inference in
GIT_COMMIT, GIT_DIRTY, OVERRIDES = "git.commit", "git.dirty", "hydra.overrides"
SWEEPER, LAUNCHER = "hydra.sweeper", "hydra.launcher"  # a sweep parent run: the Hydra plugins that ran it
# the DVC experiment a run belongs to, from the variables DVC sets for a stage (variable -> tag)
DVC_TAGS = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.baseline_rev", "DVC_STAGE": "dvc.stage"}
GIT_DIRTY_PATHS = "git.dirty_paths"                          # the changed code files that make git.dirty true
VERSION = "version.{package}"                                # python, torch, pytorch-lightning, mlflow...
EVALUATED = "cnnlab.evaluated"
CHILDREN, FAILED_CHILDREN = "cnnlab.children", "cnnlab.failed_children"
HOST, PROCESS = "cnnlab.host", "cnnlab.process"             # who writes the run: pid:start time on that host
# What a run repeats over seeds (cnnlab.tracking.repeats): the configuration's id; the job's overrides minus the seed.
CONFIGURATION, REPEATS = "cnnlab.configuration", "cnnlab.repeats"
SEEDS = "cnnlab.seeds"                                       # a sweep parent run: seeds per configuration
INTERRUPTED, RESUMES = "cnnlab.interrupted", "cnnlab.resumes"  # signal that stopped it; times it was resumed
RESUMED_AFTER = "cnnlab.resumed_after"                       # what stopped each earlier attempt of a resumed run

# --- MLflow artifacts -----------------------------------------------------------------------------------
CONFIG_ARTIFACT = "config/resolved_config.json"
SKIPPED_ARTIFACT = "data/skipped_files.json"  # every image left out of the data, with why
ENVIRONMENT_ARTIFACT = "environment/requirements.txt"  # every installed package==version: `pip install -r` it
CURVES_ARTIFACT = "metrics/curves.csv"
LEARNING_CURVES_PLOT = "plots/learning_curves.png"
MODEL_ARTIFACT = "model"
MODEL_INPUT, MODEL_INPUT_PIXELS = "cnnlab.input", "pixels in [0, 1], light on dark"  # the logged model's metadata
# How `cnnlab predict` makes a picture look like the model's training images (the logged model's
# metadata; a model without it is light_on_dark): grayscale, light on dark (IDX data), or converted
# as the image-folder and CIFAR-10 preparation converts images (cnnlab.training.images.to_network_pixels).
MODEL_PIXELS, PIXELS_LIGHT_ON_DARK, PIXELS_AS_PREPARED = "cnnlab.pixels", "light_on_dark", "as_prepared"

# --- pipeline outputs, relative to a run's output folder (dvc.yaml and conf/callbacks name them too) --
CHECKPOINT = "models/model.ckpt"
RUN_POINTER = "models/mlflow_run.json"
# what an unfinished training keeps beside them (cnnlab.training.resume; callbacks.resume_checkpoint)
RESUME_CHECKPOINT, RESUME_STATE, RESUME_LOCK = "models/last.ckpt", "models/resume.json", "models/.lock"
TRAIN_METRICS = "metrics/train.json"
CURVES_CSV = "metrics/curves.csv"
EVAL_METRICS = "metrics/eval.json"
PREDICTIONS_CSV = "metrics/predictions.csv"
PER_CLASS_CSV = "metrics/per_class.csv"
MISCLASSIFIED_PNG = "plots/misclassified.png"
CONFUSION_PNG = "plots/confusion_matrix.png"
