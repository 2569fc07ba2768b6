"""Test set-up: quiet TensorFlow logs, the TensorFlow backend, fresh seeds."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["KERAS_BACKEND"] = "tensorflow"

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

# Four logical CPUs for the tf.distribute tests: the split must happen
# before TensorFlow first touches a device, so it is made here, once.
NUM_LOGICAL_CPUS = 4
tf.config.set_logical_device_configuration(
    tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS,
)


def pytest_report_header(config):
    # Numbers round differently on each CPU and oneDNN setting: say which.
    from reference_harness import cpu_settings

    return cpu_settings.describe()


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts with the default dtype policy and a fixed seed."""
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.config.set_dtype_policy("float32")
