# %% [markdown]
# # phpn quickstart
#
# Your trained classifier and your own labelled images → part-prototypes whose sum is exactly
# each class's head row → a certificate that the predictions are unchanged → explanations.
#
# This runs offline on files that ship with phpn: the Fashion-MNIST demo CNN (weights in
# `phpn/assets`) and real Fashion-MNIST pictures. Swap in your own model and DataLoader.

# %%
import torch
from safetensors.torch import load_file
from torchvision import datasets, transforms

import phpn
from phpn.demos import get_demo
from phpn.demos.fashion_cnn import FashionCNN

demo = get_demo("fashion-mnist")  # only used to find the files below

# Your model, built by your code, with weights you loaded yourself.
model = FashionCNN(num_classes=10)
model.load_state_dict(load_file(str(demo.assets_dir / "model.safetensors")))

# Your labelled images: one folder per class, preprocessed as the model was trained.
to_tensor = transforms.Compose([transforms.Grayscale(), transforms.ToTensor(),
                                transforms.Normalize((0.286,), (0.353,))])
train = datasets.ImageFolder(demo.discovery_dir(), transform=to_tensor)
test = datasets.ImageFolder(demo.explain_dir(), transform=to_tensor)

# %%
# Decompose: k part-prototypes per class, summing exactly to the class's row of the head.
run = phpn.decompose(model, torch.utils.data.DataLoader(train, batch_size=64), k=3, images_per_class=20)

# Certify on images discovery never saw: same predictions, same logits.
certificate = run.certify(torch.utils.data.DataLoader(test, batch_size=100))
print(certificate.summary())
run  # in Jupyter: the run's summary (model, classes, k, certificate, any warning about the inputs)

# %%
# Explain one test image: in Jupyter the explanation shows itself; here it is also saved.
image, label = test[0]
explanation = run.explain(image)
print(f"{explanation.class_name}: logit {explanation.logit:.3f} = bias {explanation.bias:.3f} + "
      + " + ".join(f"{c:.3f}" for c in explanation.contributions))
explanation.save("quickstart.png")
explanation.save("quickstart.html")
run.save("quickstart-run")
explanation
