"""Ray Tune sweeps of fine-tuning: search space (space.py), config (settings.py), the trial
function (trainable.py), the Tuner (driver.py) and the outputs (report.py). Entry: mtscale/tune.py."""
