#include <gtest/gtest.h>

#include "core/tensor.h"
#include "core/weights.h"

using namespace vf;

TEST(Tensor, ReshapeAndSliceAreViews) {
  Tensor t = Tensor::from<float>({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor r = t.reshape({3, -1});
  EXPECT_EQ(r.shape(), (Shape{3, 2}));
  EXPECT_EQ(r.raw(), t.raw());
  Tensor row = t[1];
  EXPECT_EQ(row.shape(), (Shape{3}));
  EXPECT_FLOAT_EQ(row.f32()[0], 4.0f);
  EXPECT_THROW(t.reshape({4, 2}), Error);
}

TEST(Tensor, ConversionsKeepValues) {
  Tensor t = Tensor::from<float>({3}, {-1.5f, 0.0f, 2.75f});
  Tensor i = t.to(DType::I64);
  EXPECT_EQ(i.data<int64_t>()[0], -1);
  EXPECT_EQ(i.data<int64_t>()[2], 2);
  EXPECT_DOUBLE_EQ(t.to(DType::F64).at(2), 2.75);
  EXPECT_THROW(t.data<int64_t>(), Error);
}

TEST(Tensor, PoolReusesBuffers) {
  void* first;
  {
    Tensor a = Tensor::empty({1000});
    first = a.raw();
  }
  Tensor b = Tensor::empty({1000});
  EXPECT_EQ(b.raw(), first);
}

TEST(Tensor, ShapeOverflowIsAnError) {
  EXPECT_THROW(Tensor::empty({int64_t(1) << 40, int64_t(1) << 40}), Error);
}

TEST(Weights, MissingTensorsAreCollectedAndShapesChecked) {
  auto store = std::make_shared<WeightStore>();
  store->add("a.weight", Tensor::zeros({2, 2}));
  Weights w(store);
  EXPECT_NO_THROW(w.pp("a").get("weight", {2, 2}));
  EXPECT_THROW(w.pp("a").get("weight", {3, 2}), Error);
  w.pp("b").get("weight", {4});
  w.get("c", {1});
  try {
    store->check_complete();
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("b.weight"), std::string::npos);
    EXPECT_NE(std::string(e.what()).find("c [1]"), std::string::npos);
  }
}
