import pytest

from .helpers import make_texts, make_tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer()


@pytest.fixture
def texts():
    return make_texts(64)
