"""Writes the three example notebooks (sources only); `make notebooks` executes them in place."""

from pathlib import Path

import nbformat as nbf

HERE = Path(__file__).parent
SETUP = """import warnings
import matplotlib.pyplot as plt
import torch
import fiber_plugins as fp
from fiber_plugins import zoo
from fiber_plugins.data import color_mnist as cm
from fiber_plugins.grid import fiber_grid
warnings.filterwarnings("ignore", category=FutureWarning)
torch.manual_seed(0)
SETTINGS = dict(num_steps=20, inner_steps=2, lr_start=0.1, lr_end=0.002)  # small: runs in seconds on a CPU

def show(img, title="", width=9):
    plt.figure(figsize=(width, width * img.size[1] / img.size[0]))
    plt.imshow(img); plt.axis("off"); plt.title(title); plt.show()
"""


def nb(cells):
    book = nbf.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    book.cells = [nbf.v4.new_markdown_cell(c[3:]) if c.startswith("md:") else nbf.v4.new_code_cell(c) for c in cells]
    return book


captum = nb([
    "md:# Captum companion: what the classifier does *not* see\n\n"
    "You have a classifier and an attribution map from Captum. The attribution says which pixels "
    "mattered; the **fiber** shows images the model cannot tell apart from the input. Here: the "
    "shipped Color-MNIST digit CNN, Integrated Gradients, and NDTM fiber samples from the shipped "
    "diffusion prior, with the per-pixel *invariance map*.",
    SETUP,
    "from captum.attr import IntegratedGradients\n"
    "from captum.attr import visualization as viz\n"
    "from fiber_plugins.attribution import OutputFiber, visualize_invariance\n\n"
    "model = zoo.load('color-mnist-classifier')\n"
    "prior = zoo.load('color-mnist-prior')\n"
    "g, y = cm.load_digits('test')\n"
    "x, _ = cm.make_colored(g[[0]], torch.Generator().manual_seed(3))   # one held-out digit in [0, 1]\n"
    "pred = model(x).argmax(1)\n"
    "print('label', int(y[0]), 'prediction', int(pred))",
    "md:## 1. The attribution you already have",
    "ig = IntegratedGradients(model).attribute(x, target=pred)\n"
    "_ = viz.visualize_image_attr(ig[0].permute(1, 2, 0).detach().numpy(), x[0].permute(1, 2, 0).numpy(),\n"
    "                             method='blended_heat_map', sign='absolute_value', show_colorbar=True,\n"
    "                             title='Integrated Gradients for the predicted class')",
    "md:## 2. The same `target`: the fiber of one logit\n\n"
    "Captum's `target=pred` selects one number, the logit of the predicted class. Its fiber is every "
    "image with that same logit value, which is a very large set.",
    "one = OutputFiber(model).attribute(x, target=pred, prior=prior, n=6, seed=0, **SETTINGS)\n"
    "show(fiber_grid(one.result.references, one.result.images, one.result.fiber_loss), 'fiber of the predicted logit')\n"
    "with torch.no_grad():\n"
    "    print('predictions of the samples:', model(one.result.images[0]).argmax(1).tolist())",
    "md:Matching a single logit does not keep the class: other logits are free to rise. This is what "
    "an attribution for one target cannot show you.",
    "md:## 3. All logits: `target=None`\n\nThe fiber of the whole logit vector keeps the prediction; what "
    "changes is what the classifier ignores.",
    "full = OutputFiber(model).attribute(x, prior=prior, n=6, seed=0, **SETTINGS)\n"
    "res = full.result\n"
    "show(fiber_grid(res.references, res.images, res.fiber_loss), 'fiber of all ten logits')\n"
    "with torch.no_grad():\n"
    "    p_ref = model(x).softmax(1)[0, pred]\n"
    "    p_samples = model(res.images[0]).softmax(1)[:, pred[0]]\n"
    "print('p(predicted class): reference %.3f, samples %s' % (p_ref, [round(float(p), 3) for p in p_samples]))",
    "md:The samples keep the digit while background and stroke colours change: the logits carry "
    "(almost) no colour information. The invariance map is bright where the samples differ, i.e. "
    "where the model is blind; compare it with the attribution above.",
    "fig, ax = visualize_invariance(full, index=0)",
])

sae = nb([
    "md:# SAE feature inspection on a vit-prisma HookedViT\n\n"
    "Someone inspecting sparse-autoencoder features wants to know what a feature is *blind* to. "
    "The project ships a tiny HookedViT trained on Color-MNIST and a ReLU SAE trained on its "
    "`blocks.1.hook_resid_post` stream. We pick the features that fire most on a reference digit's "
    "CLS token and sample images with the same feature activations.",
    SETUP,
    "from fiber_plugins.adapters.sae import sae_objective, sae_features\n\n"
    "vit = zoo.load('color-mnist-vit')\n"
    "sae = zoo.load('color-mnist-vit-sae')\n"
    "prior = zoo.load('color-mnist-prior')\n"
    "hook = zoo.training_info('color-mnist-vit-sae')['hook']\n"
    "g, y = cm.load_digits('test')\n"
    "x, _ = cm.make_colored(g[[1]], torch.Generator().manual_seed(5))\n"
    "with torch.no_grad():\n"
    "    _, cache = vit.run_with_cache(x, names_filter=[hook])\n"
    "    code = sae.encode(cache[hook][:, 0])[0]          # CLS token\n"
    "top = code.topk(3).indices.tolist()\n"
    "print('digit', int(y[1]), '| active features:', int((code > 0).sum()), 'of', code.numel(), '| top 3:', top)",
    "plt.figure(figsize=(8, 2.5)); plt.bar(range(code.numel()), code.numpy()); plt.xlabel('SAE feature'); "
    "plt.ylabel('activation'); plt.title('SAE code of the reference (CLS token)'); plt.show()",
    "md:## One feature\n\nThe objective matches the top feature's pre-activation (ReLU features have "
    "no gradient while inactive, so the pre-activation guides better).",
    "feat = top[0]\n"
    "obj = sae_objective(vit, hook, sae, features=feat, pre_activation=True, token_reduction='cls')\n"
    "res = fp.NDTMSampler(prior, obj, **SETTINGS).sample(references=x, n=6, progress=False)\n"
    "show(fiber_grid(res.references, res.images, res.fiber_loss), f'fiber of SAE feature {feat}')\n"
    "with torch.no_grad():\n"
    "    _, c2 = vit.run_with_cache(res.images[0], names_filter=[hook])\n"
    "    acts = sae.encode(c2[hook][:, 0])[:, feat]\n"
    "print('feature', feat, 'reference %.3f' % code[feat], 'samples', [round(float(a), 3) for a in acts])\n"
    "print('ViT predictions of the samples:', vit(res.images[0]).argmax(1).tolist())",
    "md:A single feature is a weak constraint: its fiber holds many images, often other digits. "
    "That is the point of the inspection: the feature does not pin down the digit on its own.",
    "md:## The whole code\n\nMatching all features of the CLS token constrains far more.",
    "obj_all = sae_objective(vit, hook, sae, features=None, token_reduction='cls')\n"
    "res_all = fp.NDTMSampler(prior, obj_all, **SETTINGS).sample(references=x, n=6, progress=False)\n"
    "show(fiber_grid(res_all.references, res_all.images, res_all.fiber_loss), 'fiber of the whole SAE code')\n"
    "print('ViT predictions of the samples:', vit(res_all.images[0]).argmax(1).tolist())",
])

crp = nb([
    "md:# Neuron concept validation with zennit-crp\n\n"
    "A channel got a concept label. Does the label hold? We take the shipped digit CNN, find the "
    "channel of `features.8` that responds most to the digit 0 (candidate label: *'zero detector'*), "
    "look at its CRP relevance map, then sample images that activate it to the same level as the "
    "reference. If the label held, the fiber samples would all be zeros.",
    SETUP,
    "from crp.attribution import CondAttribution\n"
    "from zennit.composites import EpsilonPlusFlat\n"
    "from fiber_plugins.adapters.crp import crp_objective\n\n"
    "model = zoo.load('color-mnist-classifier')\n"
    "prior = zoo.load('color-mnist-prior')\n"
    "g, y = cm.load_digits('test')\n"
    "x_all, _ = cm.make_colored(g[:500], torch.Generator().manual_seed(0))\n"
    "with torch.no_grad():\n"
    "    acts = model.features(x_all).mean((2, 3))             # (500, 128): channel means of features.8 block\n"
    "score = acts[y[:500] == 0].mean(0) - acts[y[:500] != 0].mean(0)\n"
    "channel = int(score.argmax())\n"
    "print('candidate zero-detector channel:', channel)",
    "ref_idx = int((y == 0).nonzero()[0])\n"
    "x = cm.make_colored(g[[ref_idx]], torch.Generator().manual_seed(1))[0]\n"
    "attribution = CondAttribution(model, no_param_grad=False)\n"
    "heat = attribution(x.clone().requires_grad_(True), [{'features.10': [channel], 'y': [0]}],\n"
    "                   EpsilonPlusFlat()).heatmap\n"
    "fig, axes = plt.subplots(1, 2, figsize=(6, 3))\n"
    "axes[0].imshow(x[0].permute(1, 2, 0)); axes[0].set_title('reference'); axes[0].axis('off')\n"
    "axes[1].imshow(heat[0], cmap='bwr', vmin=-heat.abs().max(), vmax=heat.abs().max())\n"
    "axes[1].set_title(f'CRP relevance of channel {channel}'); axes[1].axis('off'); plt.show()",
    "md:## Sampling the channel's fiber\n\nThe CRP condition `{\"features.10\": [channel]}` becomes a fiber "
    "objective (channel activation, spatial mean). The composite is not active here: activation "
    "targets must not run inside a zennit composite, and the adapter refuses to.",
    "obj = crp_objective(model, {'features.10': [channel]})\n"
    "res = fp.NDTMSampler(prior, obj, **SETTINGS).sample(references=x, n=8, progress=False)\n"
    "show(fiber_grid(res.references, res.images, res.fiber_loss), f'fiber of channel {channel}')\n"
    "with torch.no_grad():\n"
    "    preds = model(res.images[0]).argmax(1)\n"
    "    a_ref = model.features(x).mean((2, 3))[0, channel]\n"
    "    a_smp = model.features(res.images[0]).mean((2, 3))[:, channel]\n"
    "print('channel activation: reference %.3f, samples %s' % (a_ref, [round(float(a), 3) for a in a_smp]))\n"
    "print('classifier predictions of the samples:', preds.tolist())\n"
    "print('fraction still classified as 0: %.2f' % float((preds == 0).float().mean()))",
    "plt.figure(figsize=(6, 2.5))\n"
    "plt.bar(range(len(a_smp)), a_smp.numpy(), label='fiber samples')\n"
    "plt.axhline(float(a_ref), color='r', ls='--', label='reference')\n"
    "plt.xlabel('sample'); plt.ylabel(f'channel {channel} activation'); plt.legend(); plt.show()",
    "md:Read the result against the label: samples that reach the reference's activation but are "
    "not zeros show that the channel responds to something broader than 'zero' (for example round "
    "strokes); samples that are all zeros support the label. Either way the evidence is images at "
    "the same activation level, not only the reference's heatmap.",
])

for name, book in [("captum_companion", captum), ("sae_feature_inspection", sae), ("neuron_concept_validation", crp)]:
    nbf.write(book, HERE / f"{name}.ipynb")
    print("wrote", HERE / f"{name}.ipynb")
