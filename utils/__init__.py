"""Small helpers shared by every script, one module per job:

  utils.io           strict weight loading, safe torch.load, atomic writes, temp-file cleanup
  utils.config       --config files, typed flag values, the originals' configs, shared flag groups
  utils.checkpoints  checkpoint paths, resume, RNG state, saving and restoring training state
  utils.distributed  EMA, rank checks, broadcasts, gradient all-reduce, wrapper stripping
  utils.fsdp         --fsdp: sharding the trained network and its EMA, full-state checkpoints
  utils.run          start_run, the data loop, StepMonitor, stop signals, LR schedules, finish_run
  utils.images       sample grids

Every name is re-exported here, so `utils.X` and `from utils import X` work as before."""

from utils.io import (  # noqa: F401
    StateDictMismatch, check_state_dict, load_state_dict_strict, UnsafeCheckpointError,
    _inert_data_globals, torch_load_safe, load_checkpoint_file, atomic_write, reserve_temp_file,
    new_file_mode, _umask, _is_disk_full, TEMP_RE, remove_stale_temp_files, atomic_save,
    atomic_write_text, atomic_save_png,
)
from utils.config import (  # noqa: F401
    load_yaml, positive_int, non_negative_int, _strict_int, OneDefaultHelpFormatter, config_value,
    _config_value_one, parse_args_with_config, apply_config_file, explicit_dests, original_config_defaults,
    apply_config_epochs,
    write_args_json, add_common_training_flags, DEFAULT_NOTICES, _notice,
    resolve_precision_defaults, finish_args, add_sit_projector_flags, add_flow_loss_flags,
    add_repa_loss_flags, add_lr_ema_flags, add_sample_grid_flags,
)
from utils.checkpoints import (  # noqa: F401
    CKPT_RE, rng_state, set_rng_state, seed_everything, list_checkpoints, checkpoint_path,
    checkpoint_problem, resolve_resume, load_resume_checkpoint, write_run_args, resume_position,
    restore_rng, save_training_checkpoint, restore_scaler,
)
from utils.distributed import (  # noqa: F401
    requires_grad, update_ema, check_ranks_identical, training_state_tensors,
    broadcast_buffers_from_main, unwrap, broadcast_from_main, allreduce_grads, tensor_fingerprints, is_sharded,
    local,
)
from utils.run import (  # noqa: F401
    create_logger, StopRequest, NonFiniteLossError, ignore_stop_signals, _WorkerInit,
    shield_workers, start_workers, STOP_SIGNALS, STOP_CHECK_EVERY, TrainRun, limit_cpu_threads, start_run,
    no_checkpoint_to_resume,
    infinite_epochs, training_loader, scalars_to_host, StepMonitor, Throughput, should_run, adamw,
    lr_multiplier, lr_scheduler, wandb_run_id, wandb_init_kwargs, checkpoint_or_stop, finish_run,
)
from utils.images import (  # noqa: F401
    save_image_grid, log_images,
)
