import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hotswap.v1 import inference_pb2 as _inference_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TrainingMethod(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINING_METHOD_UNSPECIFIED: _ClassVar[TrainingMethod]
    TRAINING_METHOD_LORA: _ClassVar[TrainingMethod]
    TRAINING_METHOD_QLORA: _ClassVar[TrainingMethod]
    TRAINING_METHOD_PROMPT_TUNING: _ClassVar[TrainingMethod]
    TRAINING_METHOD_P_TUNING: _ClassVar[TrainingMethod]
    TRAINING_METHOD_PREFIX_TUNING: _ClassVar[TrainingMethod]
    TRAINING_METHOD_CLASSIFICATION: _ClassVar[TrainingMethod]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_VALIDATING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
TRAINING_METHOD_UNSPECIFIED: TrainingMethod
TRAINING_METHOD_LORA: TrainingMethod
TRAINING_METHOD_QLORA: TrainingMethod
TRAINING_METHOD_PROMPT_TUNING: TrainingMethod
TRAINING_METHOD_P_TUNING: TrainingMethod
TRAINING_METHOD_PREFIX_TUNING: TrainingMethod
TRAINING_METHOD_CLASSIFICATION: TrainingMethod
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_VALIDATING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class TrainingExample(_message.Message):
    __slots__ = ("messages", "prompt", "completion", "instruction", "input", "output", "text", "label")
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[_inference_pb2.ChatMessage]
    prompt: str
    completion: str
    instruction: str
    input: str
    output: str
    text: str
    label: str
    def __init__(self, messages: _Optional[_Iterable[_Union[_inference_pb2.ChatMessage, _Mapping]]] = ..., prompt: _Optional[str] = ..., completion: _Optional[str] = ..., instruction: _Optional[str] = ..., input: _Optional[str] = ..., output: _Optional[str] = ..., text: _Optional[str] = ..., label: _Optional[str] = ...) -> None: ...

class InlineExamples(_message.Message):
    __slots__ = ("examples",)
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    examples: _containers.RepeatedCompositeFieldContainer[TrainingExample]
    def __init__(self, examples: _Optional[_Iterable[_Union[TrainingExample, _Mapping]]] = ...) -> None: ...

class Dataset(_message.Message):
    __slots__ = ("inline", "uri")
    INLINE_FIELD_NUMBER: _ClassVar[int]
    URI_FIELD_NUMBER: _ClassVar[int]
    inline: InlineExamples
    uri: str
    def __init__(self, inline: _Optional[_Union[InlineExamples, _Mapping]] = ..., uri: _Optional[str] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("lora_r", "lora_alpha", "lora_dropout", "target_modules", "num_virtual_tokens", "prompt_tuning_init_text", "learning_rate", "epochs", "batch_size", "gradient_accumulation_steps", "max_seq_len", "warmup_ratio", "seed", "train_on_prompt", "early_stopping_patience", "base_protection", "replay_ratio", "kl_weight", "validation_fraction", "virtual_tokens_init", "optim", "classifier_adapter", "label_names", "class_weights", "best_metric")
    LORA_R_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    NUM_VIRTUAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TUNING_INIT_TEXT_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ON_PROMPT_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    BASE_PROTECTION_FIELD_NUMBER: _ClassVar[int]
    REPLAY_RATIO_FIELD_NUMBER: _ClassVar[int]
    KL_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FRACTION_FIELD_NUMBER: _ClassVar[int]
    VIRTUAL_TOKENS_INIT_FIELD_NUMBER: _ClassVar[int]
    OPTIM_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_ADAPTER_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    CLASS_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    BEST_METRIC_FIELD_NUMBER: _ClassVar[int]
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    num_virtual_tokens: int
    prompt_tuning_init_text: str
    learning_rate: float
    epochs: int
    batch_size: int
    gradient_accumulation_steps: int
    max_seq_len: int
    warmup_ratio: float
    seed: int
    train_on_prompt: bool
    early_stopping_patience: int
    base_protection: str
    replay_ratio: float
    kl_weight: float
    validation_fraction: float
    virtual_tokens_init: str
    optim: str
    classifier_adapter: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    class_weights: _containers.RepeatedScalarFieldContainer[float]
    best_metric: str
    def __init__(self, lora_r: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., num_virtual_tokens: _Optional[int] = ..., prompt_tuning_init_text: _Optional[str] = ..., learning_rate: _Optional[float] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., warmup_ratio: _Optional[float] = ..., seed: _Optional[int] = ..., train_on_prompt: _Optional[bool] = ..., early_stopping_patience: _Optional[int] = ..., base_protection: _Optional[str] = ..., replay_ratio: _Optional[float] = ..., kl_weight: _Optional[float] = ..., validation_fraction: _Optional[float] = ..., virtual_tokens_init: _Optional[str] = ..., optim: _Optional[str] = ..., classifier_adapter: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., class_weights: _Optional[_Iterable[float]] = ..., best_metric: _Optional[str] = ...) -> None: ...

class TrainAdapterRequest(_message.Message):
    __slots__ = ("adapter_name", "method", "train", "validation", "hyperparameters", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    adapter_name: str
    method: TrainingMethod
    train: Dataset
    validation: Dataset
    hyperparameters: Hyperparameters
    labels: _containers.ScalarMap[str, str]
    def __init__(self, adapter_name: _Optional[str] = ..., method: _Optional[_Union[TrainingMethod, str]] = ..., train: _Optional[_Union[Dataset, _Mapping]] = ..., validation: _Optional[_Union[Dataset, _Mapping]] = ..., hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class TrainingJob(_message.Message):
    __slots__ = ("id", "adapter_name", "method", "state", "created_at", "started_at", "finished_at", "estimated_finish_at", "error_code", "error_message", "trained_tokens", "adapter_id", "step", "total_steps", "plan", "quality")
    ID_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_NAME_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_FINISH_AT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRAINED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    id: str
    adapter_name: str
    method: TrainingMethod
    state: JobState
    created_at: _timestamp_pb2.Timestamp
    started_at: _timestamp_pb2.Timestamp
    finished_at: _timestamp_pb2.Timestamp
    estimated_finish_at: _timestamp_pb2.Timestamp
    error_code: str
    error_message: str
    trained_tokens: int
    adapter_id: str
    step: int
    total_steps: int
    plan: TrainingPlan
    quality: QualityReport
    def __init__(self, id: _Optional[str] = ..., adapter_name: _Optional[str] = ..., method: _Optional[_Union[TrainingMethod, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., estimated_finish_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., error_code: _Optional[str] = ..., error_message: _Optional[str] = ..., trained_tokens: _Optional[int] = ..., adapter_id: _Optional[str] = ..., step: _Optional[int] = ..., total_steps: _Optional[int] = ..., plan: _Optional[_Union[TrainingPlan, _Mapping]] = ..., quality: _Optional[_Union[QualityReport, _Mapping]] = ...) -> None: ...

class TrainingPlan(_message.Message):
    __slots__ = ("hyperparameters", "automatic", "train_examples", "validation_examples", "validation_held_out", "replay_examples", "steps_per_epoch")
    HYPERPARAMETERS_FIELD_NUMBER: _ClassVar[int]
    AUTOMATIC_FIELD_NUMBER: _ClassVar[int]
    TRAIN_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_HELD_OUT_FIELD_NUMBER: _ClassVar[int]
    REPLAY_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    STEPS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    hyperparameters: Hyperparameters
    automatic: _containers.RepeatedScalarFieldContainer[str]
    train_examples: int
    validation_examples: int
    validation_held_out: bool
    replay_examples: int
    steps_per_epoch: int
    def __init__(self, hyperparameters: _Optional[_Union[Hyperparameters, _Mapping]] = ..., automatic: _Optional[_Iterable[str]] = ..., train_examples: _Optional[int] = ..., validation_examples: _Optional[int] = ..., validation_held_out: _Optional[bool] = ..., replay_examples: _Optional[int] = ..., steps_per_epoch: _Optional[int] = ...) -> None: ...

class SampleGeneration(_message.Message):
    __slots__ = ("kind", "prompt", "reference", "before", "after")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    BEFORE_FIELD_NUMBER: _ClassVar[int]
    AFTER_FIELD_NUMBER: _ClassVar[int]
    kind: str
    prompt: str
    reference: str
    before: str
    after: str
    def __init__(self, kind: _Optional[str] = ..., prompt: _Optional[str] = ..., reference: _Optional[str] = ..., before: _Optional[str] = ..., after: _Optional[str] = ...) -> None: ...

class SampleGenerations(_message.Message):
    __slots__ = ("stage", "samples")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    stage: str
    samples: _containers.RepeatedCompositeFieldContainer[SampleGeneration]
    def __init__(self, stage: _Optional[str] = ..., samples: _Optional[_Iterable[_Union[SampleGeneration, _Mapping]]] = ...) -> None: ...

class QualityReport(_message.Message):
    __slots__ = ("train_loss", "eval_loss", "control_changed", "control_agreement", "control_prompts", "samples", "classification")
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    CONTROL_CHANGED_FIELD_NUMBER: _ClassVar[int]
    CONTROL_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    train_loss: float
    eval_loss: float
    control_changed: float
    control_agreement: float
    control_prompts: int
    samples: _containers.RepeatedCompositeFieldContainer[SampleGeneration]
    classification: ClassificationReport
    def __init__(self, train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., control_changed: _Optional[float] = ..., control_agreement: _Optional[float] = ..., control_prompts: _Optional[int] = ..., samples: _Optional[_Iterable[_Union[SampleGeneration, _Mapping]]] = ..., classification: _Optional[_Union[ClassificationReport, _Mapping]] = ...) -> None: ...

class ClassificationReport(_message.Message):
    __slots__ = ("split", "label_names", "accuracy", "precision", "recall", "f1", "per_label", "confusion")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LABEL_NAMES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    PER_LABEL_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_FIELD_NUMBER: _ClassVar[int]
    split: str
    label_names: _containers.RepeatedScalarFieldContainer[str]
    accuracy: float
    precision: float
    recall: float
    f1: float
    per_label: _containers.RepeatedCompositeFieldContainer[LabelMetrics]
    confusion: _containers.RepeatedCompositeFieldContainer[ConfusionRow]
    def __init__(self, split: _Optional[str] = ..., label_names: _Optional[_Iterable[str]] = ..., accuracy: _Optional[float] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., per_label: _Optional[_Iterable[_Union[LabelMetrics, _Mapping]]] = ..., confusion: _Optional[_Iterable[_Union[ConfusionRow, _Mapping]]] = ...) -> None: ...

class LabelMetrics(_message.Message):
    __slots__ = ("label", "precision", "recall", "f1", "support")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    SUPPORT_FIELD_NUMBER: _ClassVar[int]
    label: str
    precision: float
    recall: float
    f1: float
    support: int
    def __init__(self, label: _Optional[str] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ..., support: _Optional[int] = ...) -> None: ...

class ConfusionRow(_message.Message):
    __slots__ = ("counts",)
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, counts: _Optional[_Iterable[int]] = ...) -> None: ...

class TrainAdapterResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class GetTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetTrainingJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class ListTrainingJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "state")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    state: JobState
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ListTrainingJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[TrainingJob]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[TrainingJob, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class WatchTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class StepMetrics(_message.Message):
    __slots__ = ("step", "total_steps", "epoch", "train_loss", "learning_rate", "tokens_per_second")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    epoch: float
    train_loss: float
    learning_rate: float
    tokens_per_second: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., epoch: _Optional[float] = ..., train_loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ...) -> None: ...

class EvalMetrics(_message.Message):
    __slots__ = ("step", "eval_loss", "epoch", "accuracy", "precision", "recall", "f1")
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    step: int
    eval_loss: float
    epoch: float
    accuracy: float
    precision: float
    recall: float
    f1: float
    def __init__(self, step: _Optional[int] = ..., eval_loss: _Optional[float] = ..., epoch: _Optional[float] = ..., accuracy: _Optional[float] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ...) -> None: ...

class WatchTrainingJobResponse(_message.Message):
    __slots__ = ("time", "state", "step", "eval", "checkpoint", "warning", "samples", "report", "job")
    TIME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    WARNING_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    time: _timestamp_pb2.Timestamp
    state: JobState
    step: StepMetrics
    eval: EvalMetrics
    checkpoint: str
    warning: str
    samples: SampleGenerations
    report: QualityReport
    job: TrainingJob
    def __init__(self, time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., step: _Optional[_Union[StepMetrics, _Mapping]] = ..., eval: _Optional[_Union[EvalMetrics, _Mapping]] = ..., checkpoint: _Optional[str] = ..., warning: _Optional[str] = ..., samples: _Optional[_Union[SampleGenerations, _Mapping]] = ..., report: _Optional[_Union[QualityReport, _Mapping]] = ..., job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class CancelTrainingJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelTrainingJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: TrainingJob
    def __init__(self, job: _Optional[_Union[TrainingJob, _Mapping]] = ...) -> None: ...

class UploadDatasetRequest(_message.Message):
    __slots__ = ("filename", "chunk")
    FILENAME_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    filename: str
    chunk: bytes
    def __init__(self, filename: _Optional[str] = ..., chunk: _Optional[bytes] = ...) -> None: ...

class UploadDatasetResponse(_message.Message):
    __slots__ = ("uri", "size_bytes")
    URI_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    uri: str
    size_bytes: int
    def __init__(self, uri: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class DeleteUploadRequest(_message.Message):
    __slots__ = ("uri",)
    URI_FIELD_NUMBER: _ClassVar[int]
    uri: str
    def __init__(self, uri: _Optional[str] = ...) -> None: ...

class DeleteUploadResponse(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...
