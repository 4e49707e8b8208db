"""logger=wandb (rlkit.run.wandb_logger): a start that fails online (a malformed key, an
unreachable server) falls back to offline, saying why."""


def test_wandb_that_cannot_start_online_falls_back_to_offline(tmp_path, monkeypatch, capsys):
    import wandb

    from rlkit.run.wandb_logger import WandbLogger

    monkeypatch.setenv("WANDB_API_KEY", "short")  # malformed: wandb refuses it before any network
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(str(tmp_path), {"seed": 0}, init_timeout=5)
    assert logger.mode == "offline"
    assert "online start failed: AuthenticationError" in capsys.readouterr().err
    logger.close()

    real_init = wandb.init

    def unreachable(**kwargs):  # fault injection: what an unreachable server raises
        if kwargs["mode"] == "online":
            raise wandb.errors.CommError("Timed out while retrying: no such host")
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", unreachable)
    monkeypatch.setenv("WANDB_API_KEY", "a" * 40)
    logger = WandbLogger(str(tmp_path), {"seed": 0})
    assert logger.mode == "offline"
    assert "online start failed: CommError: Timed out" in capsys.readouterr().err
    logger.close()
