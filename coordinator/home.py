"""The coordinator's home folder and its configuration.

    HOME/config.json           what `init` decided: dataset, experts, model and training settings
    HOME/signing_key.pem       the Ed25519 signing key (mode 0600)
    HOME/tls_cert.pem          the self-signed TLS certificate `serve` presents (islands pin it)
    HOME/tls_key.pem           its ECDSA P-256 key (mode 0600)
    HOME/ddm.db                the SQLite registry (unless config names another database URL)
    HOME/clustering.safetensors
    HOME/probe/cluster-<k>.safetensors   shared mode: each cluster's held-out probe slice
    HOME/artifacts/<sha256>    content-addressed store: shards, checkpoints, routers
    HOME/staging/<upload id>   uploads in progress
    HOME/work/                 the coordinator's own training state (the router)
    HOME/work/latents/         latent homes: the dataset's and probe slices' latents, cached
    HOME/damaged/              store files that failed their size or hash check, kept aside
    HOME/serve.lock            held (flock) by the process serving a SQLite home (a PostgreSQL
                               home may be served by several processes)
    HOME/ddm.db.<name>.lock    the registry's named cross-process locks (SQLite homes)

``--home`` defaults to $DDM_HOME.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ddm_model.errors import DDMError
from ddm_model.fsutil import atomic_path

CONFIG_FORMAT = "ddm.coordinator/1"


class HomeError(DDMError):
    """A coordinator home that is missing, already initialised or unreadable."""


def resolve_home(home: Path | None) -> Path:
    if home is not None:
        return home
    env = os.environ.get("DDM_HOME")
    if not env:
        raise HomeError("no coordinator home: pass --home DIR or set DDM_HOME")
    return Path(env)


MODES = ("shared", "siloed")


@dataclass
class CoordinatorConfig:
    dataset: str  # "digits", an .npz file or an image folder; "" in siloed mode
    dataset_fingerprint: str
    image_size: int | None
    experts: int
    clustering: dict  # method, features, seed, fine, sha256; {} in siloed mode
    model: dict  # DiTConfig.to_dict()
    train: dict  # TrainConfig.to_dict() given to every island
    router_model: dict  # RouterConfig.to_dict()
    router_train: dict  # TrainConfig.to_dict() for the coordinator's router run
    # > 0: the router's steps are chosen at assembly to cost this share of the signed experts'
    # training FLOPs; 0 (and every home made before shares existed): router_train's fixed steps.
    router_share: float = 0.0
    mode: str = "shared"  # shared: the coordinator holds the dataset; siloed: only the islands hold data
    router_samples: int = 1024  # siloed: samples drawn from each expert to train the router on
    router_sampling_steps: int = 20
    probe_margin: float = 0.05  # shared: an expert's probe loss must be this fraction below an untrained model's
    lease_seconds: float = 120.0
    heartbeat_seconds: float = 10.0
    max_upload_bytes: int = 0  # 0: the expected checkpoint size plus 1 MiB of header room
    # Bytes accepted for one expert from one island over all its uploads (0: 4 checkpoints' worth).
    max_expert_upload_bytes: int = 0
    stale_upload_seconds: float = 3600.0  # an open upload with no chunk for this long is abandoned
    disk_reserve_bytes: int = 64 * 1024 * 1024  # BeginUpload needs this much free beyond the upload
    database_url: str = ""  # "": SQLite at HOME/ddm.db
    # Latent homes (`init --latent`): the autoencoder experts train in the space of, as
    # ddm_model.autoencoder describes it plus the packed file's sha256 and size and the pixel
    # images' [C, H, W]; {} for a pixel-space home.
    autoencoder: dict = field(default_factory=dict)
    # Siloed homes (`init --require-dp-epsilon E`): sign only experts that declare a
    # differentially private guarantee with at most this epsilon (ddm_model.privacy); None: any.
    require_dp_epsilon: float | None = None

    def expert_upload_quota(self) -> int:
        return self.max_expert_upload_bytes or 4 * self.max_upload_bytes

    def to_json(self) -> str:
        return json.dumps({"format": CONFIG_FORMAT, **asdict(self)}, indent=2, sort_keys=True)


class Home:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "config.json"

    @property
    def key_path(self) -> Path:
        return self.root / "signing_key.pem"

    @property
    def tls_cert_path(self) -> Path:
        return self.root / "tls_cert.pem"

    @property
    def tls_key_path(self) -> Path:
        return self.root / "tls_key.pem"

    @property
    def clustering_path(self) -> Path:
        return self.root / "clustering.safetensors"

    def probe_path(self, cluster: int) -> Path:
        return self.root / "probe" / f"cluster-{cluster}.safetensors"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def staging(self) -> Path:
        return self.root / "staging"

    @property
    def work(self) -> Path:
        return self.root / "work"

    @property
    def samples(self) -> Path:
        """The dashboard's sample grids, one PNG per published manifest (named by its sha256)."""
        return self.work / "samples"

    @property
    def damaged(self) -> Path:
        return self.root / "damaged"

    def database_url(self, config: CoordinatorConfig) -> str:
        return config.database_url or f"sqlite:///{self.root / 'ddm.db'}"

    def exists(self) -> bool:
        return self.config_path.exists()

    def load_config(self) -> CoordinatorConfig:
        if not self.config_path.exists():
            raise HomeError(f"{self.root} is not a coordinator home (no config.json); run `ddm-coordinator init` first")
        try:
            data = json.loads(self.config_path.read_text())
            if data.pop("format", None) != CONFIG_FORMAT:
                raise ValueError(f"format {CONFIG_FORMAT} expected")
            return CoordinatorConfig(**data)
        except (ValueError, TypeError) as exc:
            raise HomeError(f"{self.config_path} is not a valid coordinator config: {exc}") from None

    def save_config(self, config: CoordinatorConfig) -> None:
        with atomic_path(self.config_path) as tmp:
            tmp.write_text(config.to_json())


class HomeBusy(HomeError):
    """Another process is serving the home."""


class HomeLock:
    """The serving process's exclusive claim on a home: an flock on HOME/serve.lock, which the
    kernel drops when the process ends, however it ends (SIGKILL included)."""

    def __init__(self, home: Home):
        self.path = home.root / "serve.lock"
        self._file = open(self.path, "a+")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or "unknown"
            self._file.close()
            raise HomeBusy(f"a coordinator (pid {holder}) is already serving {home.root}; stop it first") from None
        self._file.truncate(0)
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self) -> None:
        if not self._file.closed:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
