"""Configuration of the daily pipeline, in one place: defaults, paths under --home, thresholds."""

from __future__ import annotations

import dataclasses
import datetime
import os
import urllib.parse
from typing import Dict, List, Optional, Sequence, Tuple

from feature_specs import SERVING_MODEL_NAME

PROJECT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PIPELINE_NAME = "poso_ranking"
MODEL_NAME = SERVING_MODEL_NAME      # the serving model name (TF Serving base directory name)
DEFAULT_HOME = "poso_home"           # relative to the working directory unless absolute
DEFAULT_DATA = os.path.join(DEFAULT_HOME, "data")
TRAIN_DAYS = 7                       # the paper's offline protocol: train on 7 days, test on the next
DEFAULT_VARIANT = "poso_all"

# Blessing (pipeline/blessing.py says how), on the primary tasks: the overall AUC above a floor;
# against the last blessed model, the overall AUC and the new users' GAUC may drop by at most
# max(fixed drop, BLESSING_Z x the standard error of the change at the slice's size).
AUC_FLOOR = 0.5
MAX_AUC_DROP = 0.005
MAX_NEW_USER_GAUC_DROP = 0.01
BLESSING_Z = 1.96  # two-sided 95%
# A slice with fewer impressions does not gate: its AUC's normal approximation is poor and its
# standard error alone exceeds any drop worth refusing a model for.
MIN_SLICE_SIZE = 200

GRPC_PORT, REST_PORT = 8500, 8501    # TF Serving's defaults
SERVING_HOST = "127.0.0.1"
DASHBOARD_PORT = 8080                # `poso ui`


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One daily run: the date evaluated, where data and artifacts live, and how to train."""

    date: datetime.date
    data_dir: str = DEFAULT_DATA
    home: str = DEFAULT_HOME
    train_days: int = TRAIN_DAYS
    min_train_days: int = TRAIN_DAYS  # refuse to train on fewer spans unless told otherwise
    variant: str = DEFAULT_VARIANT
    # The Trainer makes `epochs` full passes over the window; train_steps, when set, is the total
    # number of steps instead (split over the epochs, the data repeated).
    epochs: int = 1
    train_steps: Optional[int] = None
    eval_steps: int = 20
    batch_size: int = 512
    model_overrides: Tuple[Tuple[str, object], ...] = ()
    warm_start: bool = False
    max_bad_row_fraction: float = 0.01
    beam_direct_running_mode: str = "multi_processing"
    beam_num_workers: int = 2
    # On DirectRunner these run in one Beam process whatever the mode: each extra worker process
    # holds its own TensorFlow, and for these the day's data as well (AvcExampleGen: the day's
    # impressions grouped by user). (The Evaluator, once TFMA, was here too; it no longer uses Beam.)
    beam_single_process_components: Tuple[str, ...] = ("AvcExampleGen",)
    extra_beam_args: Tuple[str, ...] = ()
    # ML Metadata in MySQL/MariaDB instead of HOME/metadata.sqlite: mysql_connection(URL) gives it.
    metadata_mysql: Optional[Dict[str, object]] = None  # host, port, database, username, password
    enable_cache: bool = True
    ingest_only: bool = False
    # Days recorded as lost (`poso skip-day`): never ingested, left out of the training window.
    skipped_dates: Tuple[datetime.date, ...] = ()
    infra_validation_requests: int = 16
    # Training across workers on Vertex AI (compile-kubeflow only; locally TF_CONFIG decides): the
    # Trainer becomes a Vertex custom job with a chief pool and trainer_workers - 1 workers, each of
    # which gets TF_CONFIG, so models.trainer trains under MultiWorkerMirroredStrategy.
    trainer_workers: int = 1
    trainer_machine_type: str = "n1-standard-8"
    vertex_project: Optional[str] = None
    vertex_region: str = "europe-west4"

    @property
    def home_dir(self) -> str:
        """--home as an absolute path, or as given when it is a URI (gs://..., s3://...)."""
        return self.home if "://" in self.home else os.path.abspath(self.home)

    @property
    def pipeline_root(self) -> str:
        return os.path.join(self.home_dir, "pipeline_root")

    @property
    def metadata_path(self) -> str:
        return os.path.join(self.home_dir, "metadata.sqlite")

    @property
    def fingerprint_cache_path(self) -> str:
        """SHA-256 of the log files by (path, size, mtime): each file is read once to fingerprint it."""
        return os.path.join(self.home_dir, "input_fingerprints.json")

    @property
    def metadata_location(self) -> str:
        """Where ML Metadata lives, for people: the sqlite path, or the MySQL URL without its password."""
        if not self.metadata_mysql:
            return self.metadata_path
        m = self.metadata_mysql
        return f"mysql://{m['username']}@{m['host']}:{m['port']}/{m['database']}"

    @property
    def serving_root(self) -> str:
        return os.path.join(self.home_dir, "serving")

    @property
    def serving_model_dir(self) -> str:
        """TF Serving's base directory for the model: numbered version folders inside."""
        return os.path.join(self.serving_root, MODEL_NAME)

    @property
    def models_config_path(self) -> str:
        return os.path.join(self.serving_root, "models.config")

    @property
    def pin_path(self) -> str:
        """The version `poso rollback` pinned (components/serving_config.py)."""
        return os.path.join(self.serving_root, "pinned_version.json")

    @property
    def schema_path(self) -> str:
        return os.path.join(self.home_dir, "schema", "schema.pbtxt")

    @property
    def train_dates(self) -> List[datetime.date]:
        """The train_days latest days before `date` that are not skipped, oldest first."""
        dates, day = [], self.date
        while len(dates) < self.train_days:
            day -= datetime.timedelta(days=1)
            if day not in self.skipped_dates:
                dates.append(day)
        return dates[::-1]

    @property
    def previous_date(self) -> datetime.date:
        """The day whose user state `date` starts from: the latest earlier day not skipped."""
        day = self.date - datetime.timedelta(days=1)
        while day in self.skipped_dates:
            day -= datetime.timedelta(days=1)
        return day

    def beam_pipeline_args(self, project_dir: str = PROJECT_DIR) -> List[str]:
        """DirectRunner on both cores by default; for a remote runner (--runner=DataflowRunner,
        FlinkRunner, SparkRunner via --beam-arg) workers get this project through
        project_dir/setup.py (on Kubeflow: the copy in the pipeline image)."""
        args = direct_runner_args(self.beam_direct_running_mode, self.beam_num_workers,
                                  extra=self.extra_beam_args)
        if _remote_runner(args) and not any(a.startswith("--setup_file") for a in args):
            args.append(f"--setup_file={os.path.join(project_dir, 'setup.py')}")
        return args

    def component_beam_args(self, component_id: str) -> List[str]:
        """Beam arguments `component_id` adds to beam_pipeline_args (TFX puts them after, so they
        win): one DirectRunner process for beam_single_process_components, nothing otherwise."""
        # Only extra_beam_args can pick a runner, so there is no need to build the whole list.
        if (component_id not in self.beam_single_process_components
                or _remote_runner(self.extra_beam_args)):
            return []
        return ["--direct_running_mode=in_memory", "--direct_num_workers=1"]


METADATA_MYSQL_ENV = "POSO_METADATA_MYSQL"   # the default of --metadata-mysql (cron, systemd units)


def home_config(home: str) -> "RunConfig":
    """The RunConfig of the commands that read a home rather than run a day (ui, runs, versions,
    gc): its paths, and ML Metadata in MySQL when $POSO_METADATA_MYSQL names it."""
    url = os.environ.get(METADATA_MYSQL_ENV)
    return RunConfig(date=datetime.date.today(), home=home, metadata_mysql=mysql_connection(url) if url else None)


def metadata_store_connection(cfg: "RunConfig", read_only: bool = True):
    """ml_metadata's ConnectionConfig of cfg's store (MySQL, else HOME/metadata.sqlite), or None when
    the sqlite file does not exist (nothing has run in that home yet). No TFX import."""
    from ml_metadata.proto import metadata_store_pb2

    connection = metadata_store_pb2.ConnectionConfig()
    if cfg.metadata_mysql:
        mysql = cfg.metadata_mysql
        connection.mysql.host, connection.mysql.port = str(mysql["host"]), int(mysql["port"])
        connection.mysql.database, connection.mysql.user = str(mysql["database"]), str(mysql["username"])
        connection.mysql.password = str(mysql["password"])
        return connection
    if not os.path.isfile(cfg.metadata_path):
        return None
    connection.sqlite.filename_uri = cfg.metadata_path
    connection.sqlite.connection_mode = (metadata_store_pb2.SqliteMetadataSourceConfig.READONLY if read_only
                                         else metadata_store_pb2.SqliteMetadataSourceConfig.READWRITE)
    return connection


def mysql_connection(url: str) -> Dict[str, object]:
    """`mysql://USER[:PASSWORD]@HOST[:PORT]/DATABASE` -> RunConfig.metadata_mysql.

    The user and password may be percent-encoded; the port defaults to MySQL's 3306. ML Metadata
    creates the database when it does not exist (the user needs the privilege to).
    """
    parsed = urllib.parse.urlsplit(url)
    problem = None
    if parsed.scheme != "mysql":
        problem = "it must start with mysql://"
    elif not parsed.hostname:
        problem = "it names no host"
    elif not parsed.username:
        problem = "it names no user"
    elif not parsed.path.strip("/") or "/" in parsed.path.strip("/"):
        problem = "it names no database (mysql://USER:PASSWORD@HOST:PORT/DATABASE)"
    elif parsed.query or parsed.fragment:
        problem = "options after ? or # are not supported"
    else:
        try:
            port = parsed.port or 3306
        except ValueError:
            problem = "its port is not a number from 0 to 65535"
    if problem:
        shown = urllib.parse.urlsplit(url)._replace(netloc=parsed.netloc.rsplit("@", 1)[-1]).geturl()
        raise ValueError(f"metadata MySQL URL {shown!r}: {problem}")
    return {"host": parsed.hostname, "port": port, "database": parsed.path.strip("/"),
            "username": urllib.parse.unquote(parsed.username),
            "password": urllib.parse.unquote(parsed.password or "")}


# The Beam flags by which tfx.utils.dependency_utils sees that workers get their dependencies.
_TFX_DEPENDENCY_FLAGS = ("--extra_package", "--setup_file", "--requirements_file",
                         "--worker_harness_container_image", "--sdk_container_image")


def _remote_runner(args: Sequence[str]) -> bool:
    runners = [a.split("=", 1)[1] for a in args if a.startswith("--runner=")]
    return bool(runners) and runners[-1] not in ("DirectRunner", "direct")


def direct_runner_args(mode: str = "multi_processing", workers: int = 2,
                       extra: Sequence[str] = ()) -> List[str]:
    """Beam arguments of a DirectRunner run in `mode` on `workers` processes, then `extra`.

    Unless `extra` picks a remote runner or names a dependency flag, they also name Beam's
    default SDK image: without one of TFX's dependency flags TFX copies and packages itself
    for remote workers before every Beam component (1.3 s and 52 MB of temp files each), and
    DirectRunner workers, which run in this environment, never read the flag.
    """
    # in_memory runs one worker whatever the count (and Beam warns about any other count).
    workers = 1 if mode == "in_memory" else workers
    args = [f"--direct_running_mode={mode}", f"--direct_num_workers={workers}", *extra]
    if _remote_runner(args):
        return args
    if not any(a.startswith(_TFX_DEPENDENCY_FLAGS) for a in args):
        from apache_beam.transforms import environments

        args.append("--sdk_container_image=" + environments.DockerEnvironment.default_docker_image())
    return args


# Kubeflow Pipelines v2 / Vertex AI Pipelines (pipeline/kubeflow_v2_runner.py). The paths are
# examples to override: every component reads and writes them from its container, so they must be
# remote (or mounted) storage. Custom components read files with local file APIs, so on Vertex use
# Cloud Storage FUSE paths (/gcs/BUCKET/...), on Kubeflow a mounted volume.
KUBEFLOW_PIPELINE_NAME = "poso-ranking"         # KFP v2 names: [a-z0-9][a-z0-9-]*
KUBEFLOW_IMAGE = "europe-docker.pkg.dev/PROJECT/poso/poso-ranking-pipeline:latest"
KUBEFLOW_HOME = "/gcs/poso-ranking/home"        # pipeline root, span registry, serving base directory
KUBEFLOW_DATA = "/gcs/poso-ranking/data"        # DATA/logs/YYYY-MM-DD/*.csv|*.parquet + feature tables
KUBEFLOW_PROJECT_DIR = "/pipeline"              # where the Dockerfile puts this project in the image
KUBEFLOW_SCHEMA_FILE = "/pipeline/schema/schema.pbtxt"   # written into the image by the Dockerfile
KUBEFLOW_OUTPUT = "poso_ranking_pipeline.json"
KUBEFLOW_CRON = "0 30 2 * * *"                  # KFP cron: seconds minutes hours day month weekday
