"""Mean-pooling heads for goemo's exports (written by goemo next to config.json).

transformers' BertForSequenceClassification and DistilBertForSequenceClassification read the
first ([CLS]) token; a model trained by goemo with `train.pooling: mean` reads the mean of each
row's token states instead (padding excluded), then the same pooler/pre_classifier and
classifier, under the same parameter names. Load it with

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)

The config's model_type (goemo_bert / goemo_distilbert) is not one transformers knows, so
loading without trust_remote_code fails loudly instead of silently using [CLS] pooling.
"""
import torch
from torch import nn
from transformers import BertConfig, BertModel, BertPreTrainedModel
from transformers import DistilBertConfig, DistilBertModel, DistilBertPreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput


class GoemoBertConfig(BertConfig):
    model_type = "goemo_bert"


class GoemoDistilBertConfig(DistilBertConfig):
    model_type = "goemo_distilbert"


def _mean(hidden, attention_mask):
    if attention_mask is None:
        return hidden.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1)


def _loss(config, logits, labels):
    if labels is None:
        return None
    return nn.functional.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class GoemoBertForSequenceClassification(BertPreTrainedModel):
    config_class = GoemoBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = BertModel(config, add_pooling_layer=True)
        dropout = config.classifier_dropout
        self.dropout = nn.Dropout(config.hidden_dropout_prob if dropout is None else dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None, **kwargs):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        pooled = torch.tanh(self.bert.pooler.dense(_mean(hidden, attention_mask)))
        logits = self.classifier(self.dropout(pooled))
        return SequenceClassifierOutput(loss=_loss(self.config, logits, labels), logits=logits)


class GoemoDistilBertForSequenceClassification(DistilBertPreTrainedModel):
    config_class = GoemoDistilBertConfig

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        hidden = self.distilbert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        pooled = torch.relu(self.pre_classifier(_mean(hidden, attention_mask)))
        logits = self.classifier(self.dropout(pooled))
        return SequenceClassifierOutput(loss=_loss(self.config, logits, labels), logits=logits)
