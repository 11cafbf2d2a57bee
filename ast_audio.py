"""AST, the Audio Spectrogram Transformer (Gong et al., 2021), and its Kaldi-compatible front end.

References: github.com/YuanGongND/ast; transformers' ASTModel and ASTFeatureExtractor (test references only).
"""
# ---- front end: fbank, preprocess (section owned by the media/front-end work) ----

# ---- model: AST (section owned by the encoder work) ----
